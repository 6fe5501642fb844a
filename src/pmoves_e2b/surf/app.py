"""e2b-surf (port 3080): web browsing runs (scrape and computer-use agent) in desktop sandboxes.

On one port: ``/api/health`` (no auth), the sessions API under ``/api`` (``routes.py``), the login
(``POST /login``), ``/metrics``, the web UI at ``/`` (``pages.py``, ``static/``).
Runs are ``SessionManager``'s (``sessions.py``); each mode's
runner is registered in ``runners()``; each run gets its own desktop through e2b-sandbox.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
from fastapi import APIRouter, FastAPI
from starlette.staticfiles import StaticFiles

from pmoves_e2b.config import Settings, get_settings
from pmoves_e2b.desktop.desktops import ops_for
from pmoves_e2b.desktop.links import viewer_link
from pmoves_e2b.service import DependencyCheck, make_service_app
from pmoves_e2b.store.db import Database
from pmoves_e2b.surf import pages, routes, scrape
from pmoves_e2b.surf.agent import runner as agent_runner
from pmoves_e2b.surf.browser import Browsers
from pmoves_e2b.surf.bus import serve_surf
from pmoves_e2b.surf.files import ResultFiles
from pmoves_e2b.surf.run import Runner
from pmoves_e2b.surf.sessions import SessionManager
from pmoves_e2b.web_auth import Signer, TokenAuth

HEALTH_TIMEOUT_S = 0.7


def runners(settings: Settings) -> dict[str, Runner]:
    """The runner of each mode (``models.Mode``)."""
    return {"scrape": scrape.run, "agent": agent_runner.make_runner(settings)}


def routers(settings: Settings) -> list[APIRouter]:
    desktop_token = settings.secret("E2B_DESKTOP_AUTH_TOKEN")
    base = str(settings.e2b_desktop_url)
    ttl = settings.e2b_desktop_link_ttl

    ui = pages.build_router(base)
    if not desktop_token:
        return [routes.build_router(None), ui]
    signing_token = desktop_token

    def links(desktop_id: str) -> tuple[str, str]:
        control = viewer_link(base, signing_token, desktop_id, ttl)
        return control, viewer_link(base, signing_token, desktop_id, ttl, view_only=True)

    return [routes.build_router(links), ui]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    token = settings.secret("E2B_SURF_AUTH_TOKEN")
    ops = ops_for(settings, source="e2b-surf")
    auth = TokenAuth(token, routes.PURPOSE, routes.SESSION_COOKIE, settings.e2b_surf_session_ttl)
    files = ResultFiles(
        settings.e2b_data_dir / "surf",
        Signer(token, routes.PURPOSE) if token else None,
        str(settings.next_public_api_url),
        settings.e2b_surf_file_url_ttl,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = Database(str(settings.e2b_database_url))
        browsers = Browsers(ops, warm=settings.e2b_surf_warm_desktops, max_timeout_s=settings.e2b_surf_timeout)
        sessions = SessionManager(
            db,
            browsers,
            files,
            concurrent=settings.e2b_surf_concurrent,
            timeout_s=settings.e2b_surf_timeout,
            runners=runners(settings),
        )
        app.state.surf_sessions = sessions
        await sessions.open()
        browsers.start()
        try:
            async with serve_surf(app, sessions, settings.e2b_surf_concurrent):
                yield
        finally:
            await sessions.close()
            await browsers.close()
            ops.close()
            db.close()

    async def backend() -> bool:
        url = ops.config.health_url or f"https://api.{ops.config.domain}/health"
        async with httpx.AsyncClient(timeout=HEALTH_TIMEOUT_S) as client:
            return (await client.get(url)).status_code < 500

    app = make_service_app(
        "surf",
        settings,
        health_checks=[DependencyCheck("sandbox_backend", backend, hard=True)],
        routers=routers(settings),
        lifespan=lifespan,
    )
    app.state.surf_auth = auth
    app.state.surf_files = files
    routes.install_error_handlers(app)
    app.mount("/static", StaticFiles(directory=pages.STATIC_DIR), name="static")
    return app
