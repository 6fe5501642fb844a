"""Issue 10 item 4: every route of every service needs its credential, health (and a short,
reasoned allow-list) aside. The routes are read from each service's own app (built in-process on a
scratch data dir, never started), then every one is called on the running stack with no
credential: anything but a refusal fails, so a new route without auth cannot slip in."""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from stack.harness import RunningStack
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute

from pmoves_e2b.config import Settings

pytestmark = pytest.mark.stack

SERVICES = {
    "sandbox": "pmoves_e2b.sandbox.app",
    "mcp": "pmoves_e2b.mcp.app",
    "desktop": "pmoves_e2b.desktop.app",
    "surf": "pmoves_e2b.surf.app",
}
# What may answer without a credential, and why.
OPEN = {
    ("*", "GET", "/health"): "health",
    ("*", "GET", "/healthz"): "health (PMOVES)",
    ("surf", "GET", "/api/health"): "health",
    ("*", "GET", "/openapi.json"): "the API's public description, no data",
    ("sandbox", "GET", "/metrics"): "Prometheus scrape; aggregates only, no sandbox ids",
    ("desktop", "GET", "/metrics"): "Prometheus scrape; aggregates only, no desktop ids",
    ("surf", "GET", "/metrics"): "Prometheus scrape; aggregates only",
    ("desktop", "POST", "/logout"): "clears the caller's own sign-in cookie",
    ("surf", "POST", "/logout"): "clears the caller's own sign-in cookie",
    ("surf", "GET", "/"): "the web UI's shell; every datum it shows comes from the API, which needs the token",
    ("desktop", "GET", "/"): "sign-in page for browsers (lists nothing without the token)",
    ("desktop", "POST", "/"): "the sign-in form itself: checks the token it is given",
}
REFUSED = {401, 403}


def _walk(routes: list[BaseRoute], prefix: str = "") -> Iterator[tuple[str, str]]:
    for route in routes:
        original = getattr(route, "original_router", None)  # FastAPI's included router
        if original is not None:
            yield from _walk(original.routes, prefix + route.include_context.prefix)  # type: ignore[attr-defined]
        elif isinstance(route, Mount):
            yield "GET", prefix + route.path + "/{path}"
        elif isinstance(route, WebSocketRoute) or type(route).__name__ == "APIWebSocketRoute":
            yield "WEBSOCKET", prefix + route.path  # type: ignore[attr-defined]
        elif isinstance(route, Route):
            methods = sorted((route.methods or {"GET", "POST"}) - {"HEAD"})
            for method in methods:
                yield method, prefix + route.path


def _service_routes(tmp: Path) -> dict[str, set[tuple[str, str]]]:
    settings = Settings(e2b_data_dir=tmp)  # type: ignore[call-arg]
    found = {}
    for key, module in SERVICES.items():
        app = importlib.import_module(module).create_app(settings)
        while not hasattr(app, "routes"):
            app = app.app  # the sandbox service's proxy wraps its API
        found[key] = set(_walk(app.routes))
    return found


def _open(service: str, method: str, path: str) -> bool:
    if service in ("desktop", "surf") and method == "GET" and path.startswith("/static/"):
        return True  # the pages' JS/CSS/images
    return (service, method, path) in OPEN or ("*", method, path) in OPEN


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x1", path)


def test_every_route_refuses_a_caller_without_credentials(running_stack: RunningStack, tmp_path: Path) -> None:
    routes = _service_routes(tmp_path)
    assert sum(len(r) for r in routes.values()) > 30
    unguarded = []
    with httpx.Client(timeout=30, trust_env=False) as client:
        for service, pairs in routes.items():
            base = running_stack.urls[service]
            for method, path in sorted(pairs):
                if _open(service, method, path) or method == "WEBSOCKET":
                    continue
                response = client.request(method, base + _concrete(path), json={} if method != "GET" else None)
                if response.status_code not in REFUSED:
                    unguarded.append(f"{service} {method} {path} -> {response.status_code}")
    assert unguarded == [], "\n".join(unguarded)


def test_websockets_refuse_a_caller_without_credentials(running_stack: RunningStack) -> None:
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    url = running_stack.desktop_url.replace("http", "ws", 1) + "/websockify?desktop=x1"
    with pytest.raises(InvalidStatus) as refused:
        connect(url, open_timeout=30).close()
    assert refused.value.response.status_code in REFUSED
