"""Prometheus metrics of e2b-sandbox, named as PMOVES dashboards expect."""

from prometheus_client import Counter, Gauge, Histogram

SANDBOXES_ACTIVE = Gauge("e2b_sandboxes_active", "Sandboxes running or paused")
SANDBOXES_CREATED = Counter("e2b_sandboxes_created_total", "Sandboxes created", ["template"])
CREATE_SECONDS = Histogram(
    "e2b_sandbox_create_seconds",
    "Time to create a sandbox until it is ready",
    ["template", "pooled"],
    buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5, 10, 30, 60),
)
SANDBOX_MEMORY = Gauge("e2b_sandbox_memory_bytes", "Memory used by a sandbox", ["sandbox_id"])
POOL_READY = Gauge("e2b_sandbox_pool_ready", "Warm sandboxes waiting to be claimed", ["template"])


def forget_sandbox(sandbox_id: str) -> None:
    try:
        SANDBOX_MEMORY.remove(sandbox_id)
    except KeyError:
        pass
