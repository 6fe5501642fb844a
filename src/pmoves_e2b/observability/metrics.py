"""Prometheus metrics shared by every service (one process = one service = one registry).

Names follow PMOVES' observability patterns: ``http_requests_total`` and
``http_request_duration_seconds`` labelled by method, path template and status, plus the
NATS counters. Process metrics come from prometheus-client's default collectors.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HTTP_REQUESTS = Counter("http_requests_total", "HTTP requests handled", ["method", "path", "status"])
HTTP_DURATION = Histogram(
    "http_request_duration_seconds", "Time to answer an HTTP request", ["method", "path", "status"]
)
NATS_PUBLISHED = Counter("nats_messages_published_total", "NATS messages published", ["subject"])
NATS_RECEIVED = Counter("nats_messages_received_total", "NATS messages received", ["subject"])
NATS_PUBLISH_FAILED = Counter(
    "nats_publish_failures_total", "NATS publishes dropped because the bus was unreachable", ["subject"]
)

NATS_CONNECTED = Gauge("e2b_nats_connected", "1 while this service's NATS connection is up, else 0")

UNMATCHED_PATH = "<unmatched>"


def route_template(scope: Scope) -> str:
    """The matched route's path template (bounded label cardinality), not the raw path."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) and path else UNMATCHED_PATH


class MetricsMiddleware:
    """Pure ASGI middleware counting and timing every HTTP request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            labels = (scope["method"], route_template(scope), str(status))
            HTTP_REQUESTS.labels(*labels).inc()
            HTTP_DURATION.labels(*labels).observe(time.perf_counter() - started)


async def metrics_endpoint(_: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
