"""Prometheus metrics of surf runs (no session ids or URLs as labels: /metrics has no auth)."""

from prometheus_client import Counter, Gauge, Histogram

SESSIONS_RUNNING = Gauge("e2b_surf_sessions_running", "Surf sessions queued or running in this e2b-surf")
SESSIONS_ENDED = Counter("e2b_surf_sessions_ended_total", "Surf sessions that ended", ["mode", "state"])
SESSIONS_REFUSED = Counter("e2b_surf_sessions_refused_total", "Surf sessions refused by E2B_SURF_CONCURRENT")
BROWSER_READY_SECONDS = Histogram(
    "e2b_surf_browser_ready_seconds",
    "Time from a session's start until its desktop and browser are ready",
    buckets=(1, 2, 3, 5, 7.5, 10, 15, 20, 30, 60),
)
PAGES = Counter("e2b_surf_pages_total", "Pages recorded by surf runs", ["outcome"])
STEPS = Counter("e2b_surf_steps_total", "Steps recorded by surf runs", ["kind"])
WARM_DESKTOPS = Gauge("e2b_surf_warm_desktops", "Warm desktops ready to be claimed (E2B_SURF_WARM_DESKTOPS)")
