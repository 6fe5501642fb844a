"""e2b-sandbox: the E2B control plane (REST API) and the data-plane proxy on one port.

Requests for a sandbox (``E2b-Sandbox-Id`` headers or ``{port}-{id}.{domain}`` hosts) are
forwarded by ``SandboxProxy``; everything else is the REST API. The same app also listens
with TLS on E2B_SANDBOX_TLS_PORT for host routing without deprecated SDK options.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from fastapi import FastAPI

from pmoves_e2b.config import Settings, get_settings
from pmoves_e2b.desktop_boot import WARM_TEMPLATE
from pmoves_e2b.events.outbox import OutboxRelay, StoredEvent
from pmoves_e2b.sandbox import metrics, tls
from pmoves_e2b.sandbox.admission import BootGate
from pmoves_e2b.sandbox.api import ApiKeys, Shapes, build_router, install_error_handlers
from pmoves_e2b.sandbox.errors import SignatureRefused
from pmoves_e2b.sandbox.lifecycle import CHECKPOINTING, Limits, SandboxManager, template_dir_loader
from pmoves_e2b.sandbox.proxy import Refusal, SandboxProxy, Target
from pmoves_e2b.sandbox.snapshot_api import build_snapshot_router
from pmoves_e2b.sandbox.snapshots import Snapshots
from pmoves_e2b.sandbox.template_api import DatabaseJournal, build_template_router
from pmoves_e2b.sandbox.templates.s3store import S3TemplateStore
from pmoves_e2b.sandbox.tiers import TieredBackend, Tiers
from pmoves_e2b.service import DependencyCheck, make_service_app
from pmoves_e2b.store import repo
from pmoves_e2b.store.db import Database

log = logging.getLogger(__name__)

POOLED_TEMPLATES = ("base", "code-interpreter-v1", "desktop")


def _physical_memory_mb() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // (1024 * 1024)


def _export_capacity(settings: Settings) -> None:
    """What the alert rules compare against: the sandbox limit, and the data dir's disk (read at scrape)."""
    metrics.SANDBOX_LIMIT.set(settings.e2b_max_sandboxes)
    data_dir = settings.e2b_data_dir
    metrics.DATA_DIR_FREE.set_function(lambda: shutil.disk_usage(data_dir).free)
    metrics.DATA_DIR_SIZE.set_function(lambda: shutil.disk_usage(data_dir).total)


def create_app(settings: Settings | None = None) -> Any:
    settings = settings or get_settings()
    if not (settings.e2b_database_url and settings.e2b_templates_dir):  # derived by Settings
        raise RuntimeError("E2B_DATABASE_URL / E2B_TEMPLATES_DIR were not derived")
    db = Database(settings.e2b_database_url)
    tiers = Tiers.from_settings(settings)
    remote = S3TemplateStore.from_settings(settings)
    templates_dir = settings.e2b_templates_dir
    for status in tiers.statuses.values():
        if not status.available:
            log.info("isolation tier unavailable", extra={"tier": status.name, "reason": status.reason})
    manager = SandboxManager(
        db=db,
        backend=tiers,
        load_template=template_dir_loader(settings.e2b_templates_dir),
        fetch_template=(lambda ref: remote.pull(templates_dir, ref)) if remote is not None else None,
        limits=Limits(
            max_sandboxes=settings.e2b_max_sandboxes,
            memory_mb=settings.e2b_sandbox_memory_mb,
            cpu_count=settings.e2b_sandbox_cpu_limit,
            max_timeout_s=settings.e2b_sandbox_timeout_sec,
            disk_mb=settings.e2b_sandbox_disk_mb,
            memory_budget_mb=settings.e2b_memory_budget_mb or _physical_memory_mb(),
        ),
        events_written=lambda: _wake_outbox(app),
        pool_size=settings.e2b_pool_size,
        pool_templates=POOLED_TEMPLATES
        + tuple(name.strip() for name in settings.e2b_pool_templates.split(",") if name.strip())
        + ((WARM_TEMPLATE,) if settings.e2b_desktop_warm else ()),
        pool_max=settings.e2b_pool_max,
        paused_dir=settings.e2b_data_dir / "paused",
        boot_gate=BootGate(
            settings.e2b_create_parallel or os.cpu_count() or 1,
            queue_max=settings.e2b_create_queue,
            max_wait_s=settings.e2b_create_queue_wait_sec,
        ),
    )
    _export_capacity(settings)
    api_key = settings.e2b_api_key.get_secret_value() if settings.e2b_api_key else None
    keys = ApiKeys(db, api_key)
    snapshots = Snapshots(manager, settings.e2b_templates_dir)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Before the manager starts: re-adoption may write events (sandboxes lost while down).
        relay = OutboxRelay(
            app.state.events, pending=lambda n: _pending(db, n), delivered=lambda s: repo.delete_outbox(db, s)
        )
        app.state.outbox = relay
        relay.start()
        await manager.start()
        await snapshots.collect()  # forks that ended while the service was down, or a crash mid-fork
        tls_server = asyncio.create_task(_serve_tls(settings, outer), name="tls-listener")
        try:
            yield
        finally:
            tls_server.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await tls_server
            await manager.stop()
            await relay.stop()
            db.close()

    async def database_up() -> bool:
        return await asyncio.to_thread(db.ping)

    app: FastAPI = make_service_app(
        "sandbox",
        settings,
        health_checks=[DependencyCheck("database", database_up, hard=True)],
        routers=[
            build_router(manager, keys, settings.public_domain),
            build_snapshot_router(snapshots, keys, Shapes(settings.public_domain)),
            build_template_router(
                keys.authenticate,
                settings.e2b_templates_dir,
                settings.e2b_sandbox_memory_mb,
                settings.e2b_sandbox_cpu_limit,
                settings.e2b_sandbox_disk_mb,
                live_templates=lambda: [r.template_id for r in manager.list_rows()],
                journal=DatabaseJournal(db),
                remote=remote,
            ),
        ],
        lifespan=lifespan,
        title="pmoves-e2b sandbox API (E2B-compatible)",
        error_body=e2b_error,
        health_extra=lambda: {"isolation": tiers.report()},
    )
    install_error_handlers(app)
    app.state.manager = manager

    async def resolve(sandbox_id: str) -> Target | None:
        found = manager.address(sandbox_id)
        if found is not None and found[1] == CHECKPOINTING:  # refuses connections until saved
            await manager.settled(sandbox_id)
            found = manager.address(sandbox_id)
        if found is not None and found[1] == "paused" and manager.auto_resumes(sandbox_id):
            await manager.connect(sandbox_id, None)  # lifecycle.autoResume: traffic wakes it
            found = manager.address(sandbox_id)
        if found is None and (death := manager.death(sandbox_id)) is not None:
            raise Refusal(502, f"The sandbox was not found: {death}", sandboxId=sandbox_id)
        if found is None or found[1] != "running":
            return None  # other paused sandboxes answer "not found" until connect resumes them
        network = manager.network(sandbox_id)
        return Target(
            address=found[0],
            state=found[1],
            traffic_token=network.traffic_token,
            host_mask=network.mask_request_host,
            https_ports=frozenset(network.https_ports),
        )

    async def resolve_signed_file(method: str, query: str) -> str:
        try:
            return manager.find_by_file_signature(method, query)
        except SignatureRefused as refused:
            raise Refusal(refused.status, refused.message) from None

    outer: SandboxProxy = SandboxProxy(
        app, resolve=resolve, domain=settings.public_domain, resolve_signed_file=resolve_signed_file
    )
    manager.pause_listeners.append(outer.sandbox_paused)
    manager.kill_listeners.append(outer.sandbox_killed)
    return outer


def e2b_error(status: int, _code: str, message: str) -> dict[str, Any]:
    """E2B's error shape, for the frame's own refusals."""
    return {"code": status, "message": message}


def _wake_outbox(app: FastAPI) -> None:
    relay = getattr(app.state, "outbox", None)
    if relay is not None:
        relay.wake()


def _pending(db: Database, limit: int) -> list[StoredEvent]:
    return [StoredEvent(seq, event) for seq, event in repo.pending_outbox(db, limit)]


async def _serve_tls(settings: Settings, app: Any) -> None:
    """Second listener with the local CA's wildcard certificate (lifespan runs only once)."""
    try:
        paths = tls.ensure_tls(settings.e2b_data_dir / "tls", settings.e2b_domain)
    except Exception:
        log.exception("TLS listener disabled: could not make certificates")
        return
    config = uvicorn.Config(
        app,
        host=settings.e2b_bind,
        port=settings.e2b_sandbox_tls_port,
        lifespan="off",
        ssl_certfile=str(paths.cert),
        ssl_keyfile=str(paths.key),
        log_config=None,
        access_log=False,
        timeout_keep_alive=640,
    )
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[attr-defined]  # uvicorn's private hook
    await server.serve()


def destroy_all_sandboxes(settings: Settings) -> int:
    """`pmoves-e2b down`: with the service stopped, remove every sandbox and its remains."""
    from pmoves_e2b.sandbox import lifecycle

    if not settings.e2b_database_url:  # derived by Settings
        raise RuntimeError("E2B_DATABASE_URL was not derived")
    db = Database(settings.e2b_database_url)
    try:
        return asyncio.run(lifecycle.destroy_all_sandboxes(db, TieredBackend(Tiers.from_settings(settings))))
    finally:
        db.close()
