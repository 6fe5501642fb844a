"""The shared FastAPI app factory of the four services.

``make_service_app`` gives every service the same frame: the health route (the service's
own path plus PMOVES' ``/healthz``), ``/metrics``, request metrics, a background NATS
connection with the ``services.announce.v1`` announcement, and the service's routers and
lifespan. Services put their state on ``app.state``; the frame provides
``app.state.settings``, ``app.state.events`` (EventConnection) and ``app.state.publisher``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from nats.aio.client import Client
from starlette.requests import Request

from pmoves_e2b import __version__
from pmoves_e2b.config import SERVICES, ServiceInfo, Settings
from pmoves_e2b.events import connection as nats_connection
from pmoves_e2b.events import subjects
from pmoves_e2b.events.envelope import utc_now_iso
from pmoves_e2b.events.publisher import EventPublisher, ensure_stream
from pmoves_e2b.observability.metrics import MetricsMiddleware, metrics_endpoint
from pmoves_e2b.request_guard import ErrorBody, RequestGuard, pmoves_error

log = logging.getLogger(__name__)

HEALTH_BUDGET_SECONDS = 0.8  # all dependency checks together; health must answer in < 1 s
PMOVES_HEALTH_PATH = "/healthz"

Lifespan = Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]


@dataclass(frozen=True)
class DependencyCheck:
    """One dependency in the health answer. ``hard``: when it is down, health is 503.

    ``informational``: reported, but never changes the status (a feature that is not set up).
    """

    name: str
    check: Callable[[], Awaitable[bool]]
    hard: bool = False
    up: str = "ok"
    down: str = "unavailable"
    informational: bool = False


def service_info(name: str) -> ServiceInfo:
    for service in SERVICES:
        if name in (service.key, service.name):
            return service
    raise ValueError(f"unknown service {name!r}; expected one of {', '.join(s.key for s in SERVICES)}")


def announce_payload(service: ServiceInfo, settings: Settings) -> dict[str, Any]:
    """PMOVES announcer format (slug, name, url, health_check, tier, port, timestamp, metadata)."""
    url = settings.service_url(service)
    return {
        "slug": service.name,
        "name": service.name,
        "url": url,
        "health_check": url + PMOVES_HEALTH_PATH,
        "tier": service.tier,
        "port": settings.service_port(service),
        "timestamp": utc_now_iso(),
        "metadata": {
            "version": __version__,
            "platform": "pmoves-e2b",
            "health_path": service.health_path,
            "metrics_path": "/metrics",
            "pid": os.getpid(),
        },
    }


async def _run_check(dep: DependencyCheck) -> bool:
    try:
        return bool(await dep.check())
    except Exception:  # a broken check means the dependency is not usable
        log.debug("health check %s failed", dep.name, exc_info=True)
        return False


async def health_report(
    service: ServiceInfo, started: float, checks: Sequence[DependencyCheck]
) -> tuple[int, dict[str, Any]]:
    tasks = {dep.name: asyncio.ensure_future(_run_check(dep)) for dep in checks}
    if tasks:
        await asyncio.wait(tasks.values(), timeout=HEALTH_BUDGET_SECONDS)
    dependencies: dict[str, str] = {}
    hard_down = soft_down = False
    for dep in checks:
        task = tasks[dep.name]
        ok = task.done() and not task.cancelled() and task.result()
        if not task.done():
            task.cancel()
        dependencies[dep.name] = dep.up if ok else dep.down
        if dep.informational:
            continue
        hard_down |= dep.hard and not ok
        soft_down |= not dep.hard and not ok
    status = "unhealthy" if hard_down else "degraded" if soft_down else "healthy"
    body = {
        "status": status,
        "service": service.name,
        "version": __version__,
        "uptime_seconds": round(time.monotonic() - started, 3),
        "timestamp": utc_now_iso(),
        "dependencies": dependencies,
    }
    return (503 if hard_down else 200), body


async def validation_error(_: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 shape without the offending input (it may be huge, or a secret)."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    detail = [{"type": e["type"], "loc": list(e["loc"]), "msg": e["msg"]} for e in errors]
    return JSONResponse({"detail": detail}, status_code=422)


def make_service_app(
    name: str,
    settings: Settings,
    *,
    health_checks: Sequence[DependencyCheck] = (),
    routers: Sequence[APIRouter] = (),
    lifespan: Lifespan | None = None,
    title: str | None = None,
    error_body: ErrorBody = pmoves_error,
    health_extra: Callable[[], dict[str, Any]] | None = None,
) -> FastAPI:
    """Build the FastAPI app of service ``name`` (key like "sandbox" or name like "e2b-sandbox").

    ``health_checks`` are added to the built-in NATS check (soft). ``lifespan`` runs inside the
    frame's lifespan, after the NATS connection was started and before it is closed.
    ``error_body(status, code, message)`` shapes the frame's own errors (oversized, too deeply
    nested bodies) in the service's error format. ``health_extra()`` adds fields to the health
    answer (e2b-sandbox: its isolation tiers).
    """
    service = service_info(name)
    started = time.monotonic()
    checks: list[DependencyCheck] = []

    @contextlib.asynccontextmanager
    async def frame_lifespan(app: FastAPI) -> AsyncIterator[None]:
        events = nats_connection.connect(settings, service.name)
        publisher = EventPublisher(events, source=service.name)
        app.state.events = events
        app.state.publisher = publisher

        async def announce(_: Client) -> None:
            await publisher.publish(subjects.SERVICES_ANNOUNCE, announce_payload(service, settings))

        events.on_connect(ensure_stream)
        events.on_connect(announce)
        try:
            if lifespan is None:
                yield
            else:
                async with lifespan(app):
                    yield
        finally:
            await events.close()

    # No /docs or /redoc: Swagger UI and ReDoc load their code from a CDN, and they are unauthenticated
    # pages; /openapi.json stays as the API's description.
    app = FastAPI(
        title=title or service.name, version=__version__, lifespan=frame_lifespan, docs_url=None, redoc_url=None
    )
    app.state.settings = settings
    app.state.service = service
    app.add_middleware(RequestGuard, error_body=error_body)
    app.add_middleware(MetricsMiddleware)
    app.add_exception_handler(RequestValidationError, validation_error)

    async def nats_up() -> bool:
        events = getattr(app.state, "events", None)
        return events is not None and events.connected

    checks.append(DependencyCheck("nats", nats_up, hard=False, up="connected", down="disconnected"))
    checks.extend(health_checks)

    async def health(_: Request) -> JSONResponse:
        code, body = await health_report(service, started, checks)
        if health_extra is not None:
            body.update(health_extra())
        return JSONResponse(body, status_code=code, headers={"Cache-Control": "no-store"})

    for path in dict.fromkeys((service.health_path, PMOVES_HEALTH_PATH)):
        app.add_api_route(
            path,
            health,
            methods=["GET"],
            include_in_schema=path == service.health_path,
            summary="Service health (no auth)",
        )
    app.add_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)
    for router in routers:
        app.include_router(router)
    return app
