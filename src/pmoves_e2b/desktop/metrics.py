"""Prometheus metrics of desktops (no desktop ids as labels: /metrics has no auth)."""

from prometheus_client import Counter, Gauge, Histogram

DESKTOPS_ACTIVE = Gauge("e2b_desktops_active", "Desktops running (seen by e2b-desktop's watcher)")
DESKTOPS_CREATED = Counter("e2b_desktops_created_total", "Desktops created", ["via"])
DESKTOPS_ENDED = Counter("e2b_desktops_ended_total", "Desktops that ended", ["reason"])
CREATE_SECONDS = Histogram(
    "e2b_desktop_create_seconds",
    "Time to create a desktop until its screen is up",
    buckets=(0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 30, 60),
)
ACTIONS = Counter("e2b_desktop_actions_total", "Desktop actions run", ["type"])
SCREENSHOT_SECONDS = Histogram(
    "e2b_desktop_screenshot_seconds", "Time to take a screenshot", buckets=(0.05, 0.1, 0.15, 0.25, 0.5, 1, 2, 5)
)
VIEWERS = Gauge("e2b_desktop_viewers", "Open viewer connections (WebSocket relays)")
