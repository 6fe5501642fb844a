"""e2b-desktop (port 6080): virtual desktops to watch in a browser and drive over REST.

On one port: ``/health`` (no auth: the service and whether desktops can be made), the pages
(``/`` listing, ``/desktop/{id}`` viewer, sign-in) with noVNC's library under ``/static``,
``WebSocket /websockify`` (the VNC relay), the REST API under ``/desktops``, ``/metrics``, and
the NATS consumer of ``e2b.desktop.request.v1``. The desktops themselves live in the feature
modules of this package (``desktops.py``, ``lifecycle.py``, ``bus.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from pmoves_e2b.config import Settings, get_settings
from pmoves_e2b.desktop import pages, routes
from pmoves_e2b.desktop.assets import DEFAULT_NOVNC_DIR, STATIC_DIR, novnc_ready
from pmoves_e2b.desktop.auth import DesktopAuth
from pmoves_e2b.desktop.bus import DESKTOP_ROUTE, DesktopEvents, desktop_request_handler
from pmoves_e2b.desktop.desktops import DesktopOps, ops_for
from pmoves_e2b.desktop.lifecycle import DesktopWatcher
from pmoves_e2b.desktop.links import viewer_urls
from pmoves_e2b.desktop.relay import websockify
from pmoves_e2b.events.handlers import RequestServer
from pmoves_e2b.service import DependencyCheck, make_service_app

HEALTH_TIMEOUT_S = 0.7


def health_checks(settings: Settings, ops: DesktopOps, novnc_dir: Path) -> list[DependencyCheck]:
    """Desktops can be made when the sandbox backend answers (hard) and template ``desktop`` is
    built (self-hosted: its record in E2B_TEMPLATES_DIR); the viewer needs noVNC's files. The
    last two are reported without degrading the service, which still serves the rest."""

    async def backend() -> bool:
        url = ops.config.health_url or f"https://api.{ops.config.domain}/health"
        async with httpx.AsyncClient(timeout=HEALTH_TIMEOUT_S) as client:
            return (await client.get(url)).status_code < 500

    async def template() -> bool:
        if ops.config.mode != "self-hosted" or settings.e2b_templates_dir is None:
            return True  # E2B cloud has its own `desktop` template
        return (settings.e2b_templates_dir / f"{ops.template}.json").is_file()

    async def viewer() -> bool:
        return novnc_ready(novnc_dir)

    return [
        DependencyCheck("sandbox_backend", backend, hard=True),
        DependencyCheck(
            "desktop_template",
            template,
            up="ready",
            down=f"missing (pmoves-e2b template build {ops.template})",
            informational=True,
        ),
        DependencyCheck("novnc", viewer, up="ready", down="missing (make novnc)", informational=True),
    ]


def surf_origin(settings: Settings) -> str:
    """e2b-surf's public origin (``NEXT_PUBLIC_API_URL``): its web UI embeds the viewer in a frame."""
    parts = urlsplit(str(settings.next_public_api_url or ""))
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme in ("http", "https") and parts.netloc else ""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    ops = ops_for(settings)
    auth = DesktopAuth(
        settings.secret("E2B_DESKTOP_AUTH_TOKEN"), settings.e2b_desktop_link_ttl, settings.e2b_desktop_session_ttl
    )
    novnc_dir = settings.e2b_novnc_dir or DEFAULT_NOVNC_DIR

    def require_bearer(request: Request) -> None:
        if auth.bearer(request) is None:
            raise HTTPException(
                401,
                "send 'Authorization: Bearer <E2B_DESKTOP_AUTH_TOKEN>'",
                headers={"WWW-Authenticate": 'Bearer realm="e2b-desktop"'},
            )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        watcher = DesktopWatcher(ops, DesktopEvents(app.state.publisher))
        app.state.desktop_watcher = watcher
        server = RequestServer(
            app.state.events,
            app.state.publisher,
            DESKTOP_ROUTE,
            desktop_request_handler(ops, watcher, viewer_urls(settings)),
        )
        watcher.start()
        server.start()
        try:
            yield
        finally:
            await server.stop()
            await watcher.stop()
            ops.close()

    app = make_service_app(
        "desktop",
        settings,
        health_checks=health_checks(settings, ops, novnc_dir),
        routers=[routes.build_router(require_bearer), pages.build_router(surf_origin(settings))],
        lifespan=lifespan,
    )
    app.state.desktop_ops = ops
    app.state.desktop_auth = auth
    app.state.novnc_dir = novnc_dir
    app.add_api_websocket_route("/websockify", websockify)
    app.mount("/static/novnc", StaticFiles(directory=novnc_dir, check_dir=False), name="novnc")
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    routes.install_error_handlers(app)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "error")
        return JSONResponse({"error": code, "detail": exc.detail}, exc.status_code, headers=exc.headers)

    return app
