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
# Quantiles over the live sandboxes, not one series per sandbox: /metrics needs no auth, and
# sandbox ids must not leak there (an id is enough to reach a sandbox's public ports).
SANDBOX_MEMORY = Gauge("e2b_sandbox_memory_bytes", "Memory used by live sandboxes (quantiles over them)", ["quantile"])
MEMORY_QUANTILES = (0.5, 0.95, 1.0)
POOL_READY = Gauge("e2b_sandbox_pool_ready", "Warm sandboxes waiting to be claimed", ["template"])


def set_memory_quantiles(used_bytes: list[int]) -> None:
    ordered = sorted(used_bytes)
    for q in MEMORY_QUANTILES:
        value = ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else 0
        SANDBOX_MEMORY.labels(quantile=str(q)).set(value)
