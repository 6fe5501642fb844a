"""Prometheus metrics of e2b-sandbox, named as PMOVES dashboards expect."""

from prometheus_client import Counter, Gauge, Histogram

SANDBOXES_ACTIVE = Gauge("e2b_sandboxes_active", "Sandboxes running or paused")
SANDBOXES_CREATED = Counter("e2b_sandboxes_created_total", "Sandboxes created", ["template"])
CREATE_FAILURES = Counter(
    "e2b_sandbox_create_failures_total", "Creates that failed to boot or configure a sandbox", ["template"]
)
SANDBOX_LIMIT = Gauge("e2b_sandbox_limit", "Most sandboxes that may be live at once (E2B_MAX_SANDBOXES)")
DATA_DIR_FREE = Gauge("e2b_data_dir_free_bytes", "Free space on the file system of the data dir (E2B_DATA_DIR)")
DATA_DIR_SIZE = Gauge("e2b_data_dir_size_bytes", "Size of the file system of the data dir (E2B_DATA_DIR)")
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
POOL_TARGET = Gauge("e2b_sandbox_pool_target", "Warm sandboxes the pool aims to hold (follows demand)", ["template"])
POOL_HITS = Counter("e2b_sandbox_pool_hits_total", "Creates served by a warm sandbox", ["template"])
POOL_MISSES = Counter("e2b_sandbox_pool_misses_total", "Creates that booted a sandbox cold", ["template"])
POOL_REFILL_SECONDS = Histogram(
    "e2b_sandbox_pool_refill_seconds",
    "Time to boot one warm sandbox for the pool",
    ["template"],
    buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5, 10, 30, 60),
)
CREATE_QUEUE = Gauge("e2b_sandbox_create_queue", "Creates waiting for a boot slot")
CREATES_REFUSED_BUSY = Counter("e2b_sandbox_creates_busy_total", "Creates refused because the boot queue was full")


def set_memory_quantiles(used_bytes: list[int]) -> None:
    ordered = sorted(used_bytes)
    for q in MEMORY_QUANTILES:
        value = ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else 0
        SANDBOX_MEMORY.labels(quantile=str(q)).set(value)
