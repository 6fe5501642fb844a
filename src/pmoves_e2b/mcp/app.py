"""e2b-mcp-server (port 7073): MCP bridge for agents, plus the REST routes PMOVES calls.

On one port: MCP streamable HTTP at ``/mcp``, MCP over SSE at ``/sse`` (+ ``/messages/``),
the REST routes of :mod:`pmoves_e2b.mcp.rest`, and the shared frame (``/healthz`` without
auth, ``/metrics``). Everything but health requires a credential (:mod:`pmoves_e2b.mcp.auth`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
from fastapi import FastAPI
from mcp.server.mcpserver import MCPServer
from sse_starlette import EventSourceResponse
from starlette.routing import BaseRoute

from pmoves_e2b.config import Settings, get_settings
from pmoves_e2b.desktop.desktops import DesktopOps
from pmoves_e2b.desktop.desktops import ops_for as desktop_ops_for
from pmoves_e2b.desktop.links import viewer_urls
from pmoves_e2b.mcp import desktop_rest, desktop_tools, spell_rest, spell_tools, surf_rest, surf_tools
from pmoves_e2b.mcp.auth import AuthMiddleware, parse_allowed_hosts, transport_security
from pmoves_e2b.mcp.rest import build_router, install_error_handlers
from pmoves_e2b.mcp.sandboxes import SandboxOps
from pmoves_e2b.mcp.tools import build_mcp_server
from pmoves_e2b.sdk.config import SdkConfig, sdk_config
from pmoves_e2b.service import DependencyCheck, make_service_app
from pmoves_e2b.spells.bus import serve_spells
from pmoves_e2b.spells.executor import SpellExecutor, build_executor
from pmoves_e2b.surf.client import SurfApi

# SSE streams (both transports) send a comment line this often when idle, so a client with a
# short read timeout (Agent Zero: 10 s) never sees a silent stream. sse-starlette's default is 15 s.
EventSourceResponse.DEFAULT_PING_INTERVAL = 3

HEALTH_TIMEOUT_S = 0.7
# Agent Zero is optional and may sit behind a slow resolver: remember its state for a while.
AGENT_ZERO_CACHE_S = 10.0


def build_ops(settings: Settings) -> tuple[SdkConfig, SandboxOps]:
    config = sdk_config(settings)
    return config, SandboxOps(config)


def surf_api(settings: Settings) -> SurfApi:
    return SurfApi(str(settings.e2b_surf_url), settings.secret("E2B_SURF_AUTH_TOKEN"))


def build_server(
    settings: Settings,
    ops: SandboxOps,
    desktops: DesktopOps | None = None,
    spells: SpellExecutor | None = None,
    surf: SurfApi | None = None,
) -> MCPServer:
    """Every MCP tool, the same for HTTP, SSE and stdio."""
    server = build_mcp_server(ops, settings.e2b_sandbox_timeout_sec, settings.e2b_execution_timeout_sec)
    spell_tools.register(server, spells or build_executor(settings))
    desktops = desktops or desktop_ops_for(settings, "e2b-mcp-server")
    desktop_tools.register(server, desktops, viewer_urls(settings))
    surf_tools.register(server, surf or surf_api(settings), settings.e2b_surf_timeout)
    return server


def _http_check(url: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        async with httpx.AsyncClient(timeout=HEALTH_TIMEOUT_S) as client:
            response = await client.get(url)
        return response.status_code < 500

    return check


def _cached(check: Callable[[], Awaitable[bool]], ttl: float) -> Callable[[], Awaitable[bool]]:
    state = {"at": -ttl, "ok": False}

    async def cached() -> bool:
        if time.monotonic() - state["at"] >= ttl:
            try:
                state["ok"] = await check()
            except Exception:  # noqa: BLE001 - any failure of the check means unhealthy
                state["ok"] = False
            state["at"] = time.monotonic()
        return bool(state["ok"])

    return cached


def health_checks(settings: Settings, config: SdkConfig) -> list[DependencyCheck]:
    backend_health = config.health_url or f"https://api.{config.domain}/health"
    return [
        DependencyCheck("sandbox_backend", _http_check(backend_health), hard=True),
        DependencyCheck(
            "agent_zero",
            _cached(_http_check(settings.agent_zero_url.rstrip("/") + "/healthz"), AGENT_ZERO_CACHE_S),
            hard=False,
            up="reachable",
            down="unreachable",
        ),
    ]


def _mcp_routes(server: MCPServer, settings: Settings) -> list[BaseRoute]:
    security = transport_security(parse_allowed_hosts(settings.e2b_mcp_allowed_hosts))
    http_app = server.streamable_http_app(streamable_http_path="/mcp", transport_security=security)
    sse_app = server.sse_app(sse_path="/sse", message_path="/messages/", transport_security=security)
    return [*http_app.routes, *sse_app.routes]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    config, ops = build_ops(settings)
    desktops = desktop_ops_for(settings, "e2b-mcp-server")
    spells = build_executor(settings)
    surf = surf_api(settings)
    server = build_server(settings, ops, desktops, spells, surf)
    mcp_routes = _mcp_routes(server, settings)

    @contextlib.asynccontextmanager
    async def lifespan(service_app: FastAPI) -> AsyncIterator[None]:
        # The streamable HTTP transport's task group lives as long as the service;
        # the e2b.spell.execute.v1 consumer too.
        async with server.session_manager.run(), serve_spells(service_app, spells):
            try:
                yield
            finally:
                await surf.close()

    app = make_service_app(
        "mcp",
        settings,
        health_checks=health_checks(settings, config),
        routers=[
            build_router(ops, server, settings),
            spell_rest.router(spells),
            desktop_rest.build_router(desktops, viewer_urls(settings), str(settings.e2b_desktop_url)),
            surf_rest.build_router(surf),
        ],
        lifespan=lifespan,
    )
    app.router.routes.extend(mcp_routes)
    install_error_handlers(app)
    app.add_middleware(
        AuthMiddleware,
        server_token=settings.secret("E2B_MCP_SERVER_TOKEN"),
        api_key=settings.secret("E2B_API_KEY"),
    )
    app.state.mcp_server = server
    app.state.sandbox_ops = ops
    return app
