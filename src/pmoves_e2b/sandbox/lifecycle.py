"""Sandbox lifecycle: create, connect/resume, pause, timeout, kill, warm pool, re-adoption.

The database is the source of truth for which sandboxes exist; the backend only knows how
to run them. Killing e2b-sandbox leaves sandboxes running: ``start()`` re-adopts every live
one and cleans up the remains of the dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import os
import secrets
import string
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl

from pmoves_e2b.envd import ENVD_PORT, file_signature
from pmoves_e2b.events.outbox import lifecycle_event
from pmoves_e2b.sandbox import metrics
from pmoves_e2b.sandbox.admission import BootGate
from pmoves_e2b.sandbox.aio import wait_event
from pmoves_e2b.sandbox.backends.base import (
    TEMPLATE_STARTED,
    Backend,
    BackendError,
    SandboxHandle,
    SandboxLost,
    SandboxSpec,
    SandboxStats,
    TemplateImage,
)
from pmoves_e2b.sandbox.egress import EgressProxy
from pmoves_e2b.sandbox.envd_client import EnvdClient
from pmoves_e2b.sandbox.errors import BadRequest, Conflict, LimitReached, Lost, NotFound, SandboxError, SignatureRefused
from pmoves_e2b.sandbox.netpolicy import NetworkPolicy, cidrs
from pmoves_e2b.sandbox.pool import PoolSizes, WarmPool
from pmoves_e2b.sandbox.templates.errors import TemplateNotFound
from pmoves_e2b.sandbox.templates.rootfs import remove_tree
from pmoves_e2b.sandbox.templates.store import load_template
from pmoves_e2b.sandbox.tiers import METADATA_KEY, TieredBackend, Tiers
from pmoves_e2b.store import repo
from pmoves_e2b.store.db import Database
from pmoves_e2b.store.models import SandboxRow

log = logging.getLogger(__name__)
T = TypeVar("T")

_ID_ALPHABET = string.ascii_lowercase + string.digits
DEFAULT_TIMEOUT_S = 300
READY_TIMEOUT_S = 120.0
METRICS_KEEP = 120  # samples per sandbox (10 minutes at 5 s)
DIED_KEEP = 1024  # sandboxes whose death the proxy still explains
ENVD_GONE_CHECKS = 3  # passes (5 s apart) envd's port must refuse in a row: a restart takes ~1 s
DIED = "it ended when its envd died and was not restarted (out of memory, or killed inside the sandbox)"
# A handle's state while its tier saves its memory (gVisor): its connections are reset and new ones
# refused meanwhile, so the proxy waits for the save's end (``settled``) and bury_dead leaves it be.
CHECKPOINTING = "checkpointing"

# Lifecycle events (e2b.sandbox.<kind>.v1) are stored in the outbox in the same transaction as the
# state change they report; this is called after each write so the relay sends them at once.
EventsWritten = Callable[[], None]
EVENT_SOURCE = "e2b-sandbox"
TemplateLoader = Callable[[str], TemplateImage]


@dataclass(frozen=True)
class Limits:
    max_sandboxes: int
    memory_mb: int
    cpu_count: float
    max_timeout_s: int
    disk_mb: int = 2048
    # The memory all live sandboxes together may be promised (E2B_MEMORY_BUDGET_MB); None: no check.
    memory_budget_mb: int | None = None


@dataclass
class CreateRequest:
    template_id: str
    timeout_s: int | None
    metadata: dict[str, str]
    env_vars: dict[str, str]
    allow_internet: bool
    auto_pause: bool
    api_key_id: str
    network: NetworkPolicy = field(default_factory=NetworkPolicy)
    auto_resume: bool = False
    auto_pause_memory: bool = True  # false: its timeout pauses it to disk (files only)


@dataclass(frozen=True)
class SandboxImage:
    """What a snapshot was taken of: the sandbox's template, the layers it runs on (topmost
    first), its tier, its envd's /init secret and how its template runs (TemplateRuntime record)."""

    template_id: str
    layers: tuple[str, ...]
    tier: str
    init_secret: str
    runtime: dict[str, Any]


INIT_SECRET_FILE = "init-secret"  # noqa: S105 - a file name; in a memory snapshot's image dir, 0600


def snapshot_init_secret(template: TemplateImage) -> str:
    try:
        return (Path(template.restore_image) / INIT_SECRET_FILE).read_text().strip()
    except OSError as exc:
        raise SandboxError(f"snapshot '{template.name}' is incomplete ({exc}); delete it and take it again") from exc


@dataclass
class _Live:
    """In-memory companion of a database row: the handle and recent metrics."""

    handle: SandboxHandle
    access_token: str
    # What its lifecycle events name (they never change): a kill needs no read of the row.
    template_id: str
    metadata: dict[str, str]
    samples: list[dict[str, Any]] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @classmethod
    def adopted(cls, handle: SandboxHandle, row: SandboxRow) -> _Live:
        """A sandbox of an earlier run of the service, from its row."""
        return cls(handle, row.envd_access_token, row.template_id, dict(row.metadata_ or {}))


def new_sandbox_id() -> str:
    # E2B ids are [a-z0-9]; the host-routing parser splits on '-' so none may appear.
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(20))


class SandboxManager:
    def __init__(
        self,
        db: Database,
        backend: Backend | Tiers,
        load_template: TemplateLoader,
        limits: Limits,
        events_written: EventsWritten = lambda: None,
        pool_size: int = 0,
        pool_templates: tuple[str, ...] = (),
        clock: Callable[[], datetime] = repo.utcnow,
        pool_max: int | None = None,
        boot_gate: BootGate | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        paused_dir: Path | None = None,
        fetch_template: Callable[[str], bool] | None = None,
    ) -> None:
        self.db = db
        # E2B_TEMPLATE_STORE: brings a template missing here into the templates dir (False: unknown there too).
        self.fetch_template = fetch_template
        # Sandboxes paused without memory keep their files here (<id>/layer-N), none: not offered.
        self.paused_dir = paused_dir
        self.clock = clock  # wall clock of sandbox lifetimes (end_at, pause); tests pass a fake one
        # One backend per isolation tier behind one dispatcher (a plain backend is the only tier).
        self.tiers = backend if isinstance(backend, Tiers) else Tiers.single(backend)
        self.backend: Backend = TieredBackend(self.tiers)
        self.load_template = load_template
        self.limits = limits
        self.events_written = events_written
        self.envd = EnvdClient()
        self._live: dict[str, _Live] = {}
        self._died: dict[str, str] = {}  # recently died sandboxes and why, oldest first (insertion order)
        self._refused: dict[str, int] = {}  # sandbox id -> passes in a row its envd port refused
        # Boots at once and the queue of creates beyond them (see sandbox/admission.py).
        self.boot_gate = boot_gate or BootGate(os.cpu_count() or 1, queue_max=64, max_wait_s=20.0)
        self.pool = WarmPool(
            PoolSizes(floor=pool_size, ceiling=pool_size if pool_max is None else pool_max),
            pool_templates,
            load_template,
            lambda template: self._spec(new_sandbox_id(), template, True, self.tiers.default_for(template.isolation)),
            lambda spec: self._boot(spec, self.boot_gate.refill),
            lambda handle: self._spawn(self._destroy_quietly(handle)),
            self._pool_room,
            monotonic,
        )
        self._reaper_wakeup = asyncio.Event()
        # The earliest end the reaper waits for (None: none): a create ending later need not wake it.
        self._next_deadline: datetime | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._create_slots = asyncio.Lock()
        self._reserved = 0  # creates in flight, counted against the limit
        self._reserved_mb = 0  # their memory, counted against the memory budget
        # Called with a sandbox id once it is frozen (the proxy fails its requests in flight).
        self.pause_listeners: list[Callable[[str], None]] = []
        # Called with a sandbox id once it is killed (the proxy ends its requests in flight).
        self.kill_listeners: list[Callable[[str], None]] = []
        # Awaited with a killed sandbox's template id once it is torn down (snapshots.py collects
        # the hidden snapshot behind forks when its last fork is gone).
        self.end_listeners: list[Callable[[str], Awaitable[None]]] = []
        self._ending: dict[str, _Live] = {}  # killed, teardown in flight: their mounts still read their layers
        self.egress = EgressProxy()

    async def _store(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a store call on a worker thread: a database round trip (Postgres) must not stall the
        event loop that also streams the data-plane proxy."""
        return await asyncio.to_thread(call, self.db, *args, **kwargs)

    async def _update_row(self, sandbox_id: str, **changes: Any) -> SandboxRow | None:
        updated: SandboxRow | None = await self._store(repo.update_sandbox, sandbox_id, **changes)
        return updated

    # --- service start / stop -----------------------------------------------------------

    async def start(self) -> None:
        await self._readopt()
        self._tasks = [
            asyncio.create_task(self._reaper(), name="sandbox-reaper"),
            asyncio.create_task(self._sampler(), name="sandbox-sampler"),
        ]
        if self.pool.enabled:
            self._tasks.append(asyncio.create_task(self.pool.run(), name="sandbox-pool"))

    async def stop(self) -> None:
        """Stop background work. User sandboxes keep running; pooled ones are destroyed."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await asyncio.gather(*(self._destroy_quietly(handle) for handle in self.pool.drain()))
        if self._background:
            # Within the supervisor's stop grace; what is cut off, the next start cleans up.
            await asyncio.wait(self._background, timeout=5)
        await self.egress.close()
        await self.envd.close()

    async def _readopt(self) -> None:
        known: set[str] = set()
        for row in await self._store(repo.live_sandboxes):
            handle = SandboxHandle.from_dict(row.handle) if row.handle else None
            if handle is not None and _on_disk(handle):  # paused without memory: only its files
                self._live[row.sandbox_id] = _Live.adopted(handle, row)
                log.info("re-adopted sandbox paused to disk", extra={"sandbox_id": row.sandbox_id})
                continue
            if handle is not None and await self.backend.is_alive(handle):
                handle.state = row.state
                self._live[row.sandbox_id] = _Live.adopted(handle, row)
                known.add(row.sandbox_id)
                try:
                    await self._sync_intercept(handle)  # the egress proxy of a sandbox with domain rules
                except Exception:
                    log.exception("egress proxy not restored", extra={"sandbox_id": row.sandbox_id})
                log.info("re-adopted sandbox", extra={"sandbox_id": row.sandbox_id, "state": row.state})
                continue
            await self._update_row(
                row.sandbox_id,
                state="killed",
                killed_at=self.clock(),
                kill_reason="lost",
                outbox=[_event("killed", row, "lost")],
            )
            self.events_written()
            log.warning("sandbox died while the service was down", extra={"sandbox_id": row.sandbox_id})
        removed = await self.backend.cleanup_orphans(known)
        if removed:
            log.info("cleaned up remains of dead sandboxes", extra={"count": len(removed)})
        metrics.SANDBOXES_ACTIVE.set(len(self._live))

    # --- create -------------------------------------------------------------------------

    async def create(self, req: CreateRequest) -> SandboxRow:
        timeout_s = self._check_timeout(req.timeout_s if req.timeout_s is not None else DEFAULT_TIMEOUT_S)
        template = await self._template_or_fetch(req.template_id)
        tier = self.tiers.choose(req.metadata.get(METADATA_KEY), template.name, template.isolation)
        started = time.perf_counter()
        async with self._create_slots:
            # Count and reserve under one lock so concurrent creates cannot overshoot the limit.
            live, live_mb = await self._store(repo.live_totals)  # one query for both limits
            if live + self._reserved >= self.limits.max_sandboxes:
                raise LimitReached(
                    f"You have reached the maximum number of concurrent sandboxes ({self.limits.max_sandboxes}). "
                    "Kill a sandbox or raise E2B_MAX_SANDBOXES."
                )
            memory_mb = self._memory_mb(template)
            self._check_memory_budget(live_mb, memory_mb)
            self._reserved += 1
            self._reserved_mb += memory_mb
            reserved = True
        try:
            # Warm sandboxes run the template's default tier.
            pooled = self.pool.claim(template) if tier == self.tiers.default_for(template.isolation) else None
            if pooled is not None:
                handle, spec = pooled.handle, dataclasses.replace(pooled.spec, allow_internet=req.allow_internet)
            else:
                spec = self._spec(new_sandbox_id(), template, req.allow_internet, tier)
            access_token = secrets.token_urlsafe(24)
            try:
                # A template with nothing to start: /init is envd's first request and its readiness check.
                bare = not (template.start_cmd or template.ready_port or template.ready_cmd or template.restore_image)
                if pooled is None:
                    handle = await self._boot(spec, self.boot_gate.create, health=not bare)
                elif not req.allow_internet:
                    await self._cut_internet(handle)
                network = req.network
                if not network.allow_public_traffic:
                    network = dataclasses.replace(network, traffic_token=secrets.token_urlsafe(24))
                handle.details["network"] = network.to_dict()
                if network.allow_out or network.deny_out:
                    await self._apply_egress(handle, network)
                handle.details["autoResume"] = req.auto_resume
                handle.details["autoPauseMemory"] = req.auto_pause_memory
                await self._init(handle, template, req.env_vars, access_token, pooled is None and bare)
            except SandboxError as exc:
                metrics.CREATE_FAILURES.labels(template=template.name).inc()
                failed = lifecycle_event(
                    "failed", spec.sandbox_id, template.name, req.metadata, exc.message, source=EVENT_SOURCE
                )
                await self._store(repo.add_outbox, [failed])
                self.events_written()
                raise
            now = self.clock()
            row = SandboxRow(
                sandbox_id=spec.sandbox_id,
                template_id=template.name,
                state="running",
                started_at=now,
                end_at=now + timedelta(seconds=timeout_s),
                paused_remaining_s=None,
                cpu_count=spec.cpu_count,
                memory_mb=spec.memory_mb,
                disk_mb=spec.disk_mb,
                allow_internet=req.allow_internet,
                auto_pause=req.auto_pause,
                metadata_=req.metadata,
                env_vars=req.env_vars,
                envd_access_token=access_token,
                api_key_id=req.api_key_id,
                handle=handle.to_dict(),
            )
            # Stored and unreserved in one step under the create lock: a create counting meanwhile
            # sees this one reserved or stored, never neither (the limit was once overshot when the
            # reservation went while another create's count was on its way back from the store).
            # Its audit row commits with it: one transaction per create.
            elapsed = time.perf_counter() - started
            audit = repo.AuditEntry(
                req.api_key_id,
                "sandbox.create",
                row.sandbox_id,
                {"template": template.name, "pooled": pooled is not None, "seconds": round(elapsed, 4)},
            )
            async with self._create_slots:
                await self._store(repo.add_sandbox, row, outbox=[_event("created", row, None)], audit=audit)
                self._live[row.sandbox_id] = _Live(handle, access_token, row.template_id, dict(req.metadata))
                self._reserved -= 1
                self._reserved_mb -= memory_mb
                reserved = False
        finally:
            if reserved:
                self._reserved -= 1
                self._reserved_mb -= memory_mb
        elapsed = time.perf_counter() - started
        metrics.SANDBOXES_CREATED.labels(template=template.name).inc()
        metrics.CREATE_SECONDS.labels(template=template.name, pooled=str(pooled is not None).lower()).observe(elapsed)
        metrics.SANDBOXES_ACTIVE.set(len(self._live))
        if self._next_deadline is None or row.end_at < self._next_deadline:
            self._reaper_wakeup.set()  # it ends before any other: the reaper recomputes its wait
        self.pool.wake()
        self.events_written()
        return row

    async def _init(
        self, handle: SandboxHandle, template: TemplateImage, env_vars: dict[str, str], token: str, first: bool = False
    ) -> None:
        """Hand the sandbox its env vars, access token, user and workdir (envd /init). ``first``: no
        request reached envd yet (``_boot`` without health), so /init is retried until envd answers."""
        try:
            await self.envd.init(
                handle.address,
                handle.init_secret,
                {
                    "envVars": env_vars,
                    "accessToken": token,
                    "defaultUser": template.user,
                    "defaultWorkdir": template.workdir,
                    "timestamp": repo.utcnow().isoformat(),  # envd sets its clock from it: the real time
                },
                READY_TIMEOUT_S if first else 0.0,
            )
        except Exception as exc:
            await asyncio.shield(self._destroy_quietly(handle))
            raise SandboxError(f"the sandbox did not accept its configuration: {exc}") from exc
        except BaseException:
            await asyncio.shield(self._destroy_quietly(handle))
            raise

    async def _template_or_fetch(self, template_id: str) -> TemplateImage:
        try:
            return self.load_template(template_id)
        except KeyError:
            if self.fetch_template is None:
                return self._template(template_id)  # its 404
        try:  # downloads layers: off the event loop
            await asyncio.to_thread(self.fetch_template, template_id)
        except Exception as exc:
            raise SandboxError(f"template '{template_id}' is not here and the template store failed: {exc}") from exc
        return self._template(template_id)

    def _template(self, template_id: str) -> TemplateImage:
        try:
            return self.load_template(template_id)
        except KeyError as exc:
            raise NotFound(exc.args[0] if exc.args else f"template '{template_id}' not found") from exc

    def _check_memory_budget(self, live_mb: int, memory_mb: int) -> None:
        # Memory limits are promises: refuse the create that would promise more than the machine has.
        budget = self.limits.memory_budget_mb
        if budget is None:
            return
        promised = live_mb + self._reserved_mb
        if promised + memory_mb > budget:
            raise LimitReached(
                f"Not enough memory for another sandbox: live sandboxes hold {promised} MB of the "
                f"{budget} MB budget (E2B_MEMORY_BUDGET_MB) and this one needs {memory_mb} MB "
                "(E2B_SANDBOX_MEMORY_MB or the template's). Kill a sandbox or change those settings."
            )

    def _memory_mb(self, template: TemplateImage) -> int:
        return template.memory_mb or self.limits.memory_mb

    async def _pool_room(self, template: TemplateImage) -> int:
        """How many more warm sandboxes of ``template`` fit beside the live ones, the creates in
        flight and the pool itself, under E2B_MAX_SANDBOXES and the memory budget."""
        memory_mb = self._memory_mb(template)
        async with self._create_slots:  # a create moves from reserved to live under this lock
            held, held_mb = self.pool.held()
            live, live_mb = await self._store(repo.live_totals)
            room = self.limits.max_sandboxes - live - self._reserved - held
            budget = self.limits.memory_budget_mb
            if budget is not None:
                promised = live_mb + self._reserved_mb + held_mb
                room = min(room, (budget - promised) // memory_mb)
        return max(0, room)

    def _check_timeout(self, timeout_s: int) -> int:
        if timeout_s < 0:
            raise BadRequest("timeout must be a non-negative number of seconds")
        if timeout_s > self.limits.max_timeout_s:
            raise BadRequest(
                f"timeout {timeout_s} s is longer than the maximum sandbox lifetime "
                f"({self.limits.max_timeout_s} s, E2B_SANDBOX_TIMEOUT_SEC)"
            )
        return timeout_s

    def _spec(self, sandbox_id: str, template: TemplateImage, allow_internet: bool, tier: str) -> SandboxSpec:
        return SandboxSpec(
            sandbox_id=sandbox_id,
            template=template,
            memory_mb=self._memory_mb(template),
            cpu_count=template.cpu_count or self.limits.cpu_count,
            disk_mb=self.limits.disk_mb,
            allow_internet=allow_internet,
            # A restored envd keeps the secret of the sandbox it was snapshotted from.
            init_secret=snapshot_init_secret(template) if template.restore_image else secrets.token_urlsafe(24),
            isolation=tier,
        )

    async def _boot(
        self,
        spec: SandboxSpec,
        slot: Callable[[], AbstractAsyncContextManager[None]] = contextlib.nullcontext,
        health: bool = True,
    ) -> SandboxHandle:
        """Start a sandbox and its template's start command; return once it is ready. ``slot`` is
        held while the sandbox starts up to envd answering (the CPU-heavy part, see admission.py).
        ``health`` False: the caller's next request (/init, retried) is envd's readiness check; the
        backend returned once envd accepted connections, so that saves a round trip per create."""
        async with slot():
            try:
                handle = await self.backend.create(spec)
            except BackendError as exc:
                raise SandboxError(f"could not start the sandbox: {exc}") from exc
            if health:
                await self._ready_or_destroyed(
                    handle, self.envd.wait_http_ok(handle.address, ENVD_PORT, "/health", READY_TIMEOUT_S)
                )
        # What it runs on, for snapshots (its template may be rebuilt or deleted meanwhile).
        handle.details["layers"] = list(spec.template.layers)
        handle.details["runtime"] = spec.template.runtime_record()
        if spec.template.restore_image or handle.details.get(TEMPLATE_STARTED):  # restored: its processes run already
            return handle
        await self._ready_or_destroyed(handle, self.envd.start_template(handle.address, spec.template, READY_TIMEOUT_S))
        return handle

    # --- pausing to disk ---------------------------------------------------------------

    def _checkpoints(self, handle: SandboxHandle) -> bool:
        """A pause with memory goes to disk where the tier checkpoints (gVisor)."""
        backend = self.tiers.backend(handle.backend)
        return self.paused_dir is not None and all(
            hasattr(backend, name) for name in ("checkpoint", "restore", "export_filesystem")
        )

    async def _pause_to_disk(self, handle: SandboxHandle, memory: bool = False) -> SandboxHandle:
        """Keep the sandbox's file changes as a layer under ``paused_dir`` and, with ``memory``,
        its checkpoint beside it, and end the sandbox; returns the handle it is remembered by (no
        processes, no address). A Conflict, with the sandbox running on, if its memory cannot be saved."""
        backend = self.tiers.backend(handle.backend)
        export = getattr(backend, "export_filesystem", None)
        if self.paused_dir is None or export is None:
            raise BadRequest(
                f"pausing without memory (mode 'filesystem') is not supported by this sandbox's isolation tier "
                f"'{handle.backend}'; pause it with memory instead"
            )
        where = self.paused_dir / handle.sandbox_id
        await asyncio.to_thread(where.mkdir, 0o700, True, True)
        number = len(list(where.glob("layer-*"))) + 1
        layer = where / f"layer-{number}"
        image = where / f"memory-{number}" if memory else None
        if image is not None:
            await asyncio.to_thread(image.mkdir, 0o700)
            try:
                await self._checkpoint(handle, getattr(backend, "checkpoint"), image)  # noqa: B009 - stopped: the copy sees one moment
            except BaseException:
                await asyncio.to_thread(remove_tree, image)
                raise
            await asyncio.to_thread(_write_secret, image / INIT_SECRET_FILE, handle.init_secret)
        else:
            await self.backend.pause(handle)  # frozen: the copy sees one moment
        try:
            await export(handle, layer)
        except BaseException:
            await asyncio.to_thread(remove_tree, layer)
            if image is not None:
                await self._restore(handle, image)
                await asyncio.to_thread(remove_tree, image)
            else:
                await self.backend.resume(handle)
            raise
        await self.backend.destroy(handle)  # before a resume could boot it again under its id
        kept = {key: handle.details[key] for key in _KEPT_ON_DISK if key in handle.details}
        layers = [str(layer), *(handle.details.get("layers") or ())]
        return SandboxHandle(
            sandbox_id=handle.sandbox_id,
            backend=handle.backend,
            address="",
            init_secret="",
            state="paused",
            details={**kept, "layers": layers, ON_DISK: True, **({MEMORY_IMAGE: str(image)} if image else {})},
        )

    async def _boot_from_disk(self, row: SandboxRow, paused: SandboxHandle) -> SandboxHandle:
        """Boot a sandbox paused to disk again: same id and access token, its files on top of its
        template's, its network rules; its processes start afresh (the template's start command),
        or, paused with memory, run on from its checkpoint."""
        runtime = TemplateImage.runtime_from_record(paused.details.get("runtime") or {})
        template = TemplateImage(name=row.template_id, layers=tuple(paused.details["layers"]), **runtime)
        # paused with memory: its checkpoint is restored (its processes run on), else it boots
        image = paused.details.get(MEMORY_IMAGE, "")
        spec = self._spec(
            row.sandbox_id, dataclasses.replace(template, restore_image=image), row.allow_internet, paused.backend
        )
        handle = await self._boot(spec, self.boot_gate.create)
        if image:
            handle.details["runtime"] = paused.details.get("runtime") or template.runtime_record()
        try:
            network = NetworkPolicy.from_dict(paused.details["network"]) if "network" in paused.details else None
            if network is not None:
                handle.details["network"] = network.to_dict()
                if network.allow_out or network.deny_out:
                    await self._apply_egress(handle, network)
            handle.details["autoResume"] = paused.details.get("autoResume", False)
            handle.details["autoPauseMemory"] = paused.details.get("autoPauseMemory", True)
        except BaseException:
            await asyncio.shield(self._destroy_quietly(handle))
            raise
        await self._init(handle, template, row.env_vars or {}, row.envd_access_token)
        if image:  # restored: the image is read (a later pause writes a new one)
            await asyncio.to_thread(remove_tree, Path(image))
        return handle

    # --- snapshots (sandbox/snapshots.py keeps them as templates) ------------------------

    async def capture(self, sandbox_id: str, layer_dir: Path, image_dir: Path | None) -> SandboxImage:
        """Write the sandbox's file changes as a template layer at ``layer_dir`` and, with
        ``image_dir``, its memory image there; the sandbox is frozen (or, for its memory,
        checkpointed) meanwhile and then runs on. ``Lost`` when the save ended it."""
        try:
            return await self._capture(sandbox_id, layer_dir, image_dir)
        except Lost as lost:
            await self._bury_lost(sandbox_id, lost)
            raise

    async def _capture(self, sandbox_id: str, layer_dir: Path, image_dir: Path | None) -> SandboxImage:
        self.get(sandbox_id)
        live = self._live[sandbox_id]
        tier = live.handle.backend
        backend = self.tiers.backend(tier)
        export = getattr(backend, "export_filesystem", None)
        checkpoint = getattr(backend, "checkpoint", None)
        if export is None or (image_dir is not None and checkpoint is None):
            able = [name for name in self.tiers.statuses if self._can_snapshot(name, image_dir is not None)]
            what = "snapshots with memory (mode 'full', and forks)" if image_dir else "filesystem snapshots"
            hints = (
                [f"tiers here that can: {', '.join(able)} (choose one with metadata '{METADATA_KEY}')"] if able else []
            )
            if image_dir is not None and export is not None:
                hints.append("a filesystem-only snapshot (mode 'filesystem') works on this tier")
            raise BadRequest(
                f"{what} are not supported by this sandbox's isolation tier '{tier}'"
                + "".join(f"; {hint}" for hint in hints)
            )
        async with live.lock:
            handle = live.handle
            if image_dir is not None and handle.state != "running":
                raise Conflict(f"sandbox '{sandbox_id}' is paused; resume it (connect) before a snapshot with memory")
            if image_dir is not None and checkpoint is not None:
                # The checkpoint stops the sandbox, so the files are copied at the moment it saved.
                await self._checkpoint(handle, checkpoint, image_dir)
                try:
                    await export(handle, layer_dir)
                finally:
                    await self._restore(handle, image_dir)
            else:
                running = handle.state == "running"
                if running:
                    await self.backend.pause(handle)
                try:
                    await export(handle, layer_dir)
                finally:
                    if running:
                        await self.backend.resume(handle)
        row = self.get(sandbox_id)
        if "layers" in handle.details:
            layers, runtime = handle.details["layers"], handle.details["runtime"]
        else:  # booted before handles recorded what they run on: its template as it is now
            template = self.load_template(row.template_id)
            layers, runtime = list(template.layers), template.runtime_record()
        return SandboxImage(row.template_id, tuple(layers), tier, handle.init_secret, runtime)

    async def _checkpoint(
        self, handle: SandboxHandle, checkpoint: Callable[[SandboxHandle, Path], Awaitable[None]], image_dir: Path
    ) -> None:
        """Save the sandbox's memory (it stops); its state is CHECKPOINTING from here until the
        caller settles it. Conflict (it runs on as before) when it could not be saved, Lost when the
        failed save ended it."""
        state, handle.state = handle.state, CHECKPOINTING
        for listener in self.pause_listeners:  # its connections are about to be reset: end the proxy's exchanges
            listener(handle.sandbox_id)
        try:
            await checkpoint(handle, image_dir)
        except SandboxLost as exc:
            raise Lost(f"its memory could not be saved and the sandbox ended ({exc})") from exc
        except BackendError as exc:
            handle.state = state
            raise Conflict(f"the sandbox's memory could not be saved: {exc}") from exc
        except BaseException:
            handle.state = state
            raise
        handle.state = CHECKPOINTING

    async def _restore(self, handle: SandboxHandle, image_dir: Path) -> None:
        """Run a checkpointed sandbox again (``restore`` of its tier); Lost when that fails."""
        try:
            await getattr(self.tiers.backend(handle.backend), "restore")(handle, image_dir)  # noqa: B009 - tiers that checkpoint have it
        except BackendError as exc:
            raise Lost(f"it was saved but could not be run again ({exc})") from exc

    def _can_snapshot(self, tier: str, memory: bool) -> bool:
        if not self.tiers.statuses[tier].available:
            return False
        needs = ("export_filesystem", "checkpoint") if memory else ("export_filesystem",)
        return self.tiers.has(tier, *needs)  # read from its class: no backend is made to word an error

    async def _ready_or_destroyed(self, handle: SandboxHandle, ready: Awaitable[None]) -> None:
        try:
            await ready
        except Exception as exc:
            await asyncio.shield(self._destroy_quietly(handle))
            raise SandboxError(f"the sandbox started but did not become ready: {exc}") from exc
        except BaseException:  # cancelled (shutdown): never leave a running sandbox nobody owns
            await asyncio.shield(self._destroy_quietly(handle))
            raise

    async def _apply_egress(self, handle: SandboxHandle, network: NetworkPolicy) -> None:
        try:
            await self.backend.set_egress(handle, network.allow_cidrs, cidrs(network.deny_out))
            await self._sync_intercept(handle)
        except Exception as exc:
            await self.egress.stop(handle.sandbox_id)
            await asyncio.shield(self._destroy_quietly(handle))
            raise SandboxError(f"could not apply the sandbox's network rules: {exc}") from exc

    async def _sync_intercept(self, handle: SandboxHandle) -> None:
        """Domain rules need the egress proxy: start or stop it to match ``details["network"]``."""
        sandbox_id = handle.sandbox_id
        wanted = NetworkPolicy.from_dict(handle.details.get("network")).has_domains
        if wanted and not self.egress.serving(sandbox_id):
            never = self.backend.never_reachable()

            def decide(host: str | None, ip: str, port: int) -> bool:
                current = NetworkPolicy.from_dict(handle.details.get("network"))  # updates apply at once
                return current.decide(host, ip, never, bool(handle.details.get("allow_internet", True)))

            await self.egress.serve(sandbox_id, await self.backend.open_intercept(handle), decide)
        elif not wanted and self.egress.serving(sandbox_id):
            await self.egress.stop(sandbox_id)
            await self.backend.close_intercept(handle)

    async def _cut_internet(self, handle: SandboxHandle) -> None:
        try:
            await self.backend.set_internet(handle, False)
        except Exception as exc:
            await asyncio.shield(self._destroy_quietly(handle))
            raise SandboxError(f"could not turn off the sandbox's internet access: {exc}") from exc

    # --- queries ------------------------------------------------------------------------

    def get(self, sandbox_id: str) -> SandboxRow:
        row = repo.get_sandbox(self.db, sandbox_id)
        if row is not None and row.state == "killed" and row.kill_reason == "died":
            raise NotFound(f"sandbox '{sandbox_id}' not found: {self._died.get(sandbox_id, DIED)}")
        if row is None or row.state == "killed" or sandbox_id not in self._live:
            raise NotFound(f"sandbox '{sandbox_id}' not found")
        return row

    def death(self, sandbox_id: str) -> str | None:
        """Why a recently died sandbox is gone (None if it did not die), for the proxy's answer."""
        return self._died.get(sandbox_id)

    def list_rows(self) -> list[SandboxRow]:
        return [row for row in repo.live_sandboxes(self.db) if row.sandbox_id in self._live]

    def find_by_file_signature(self, method: str, query: str) -> str:
        """The live sandbox whose envd token signed this /files URL (see envd's auth rules);
        ``SignatureRefused`` with envd's message when none did."""
        params = dict(parse_qsl(query, keep_blank_values=True))
        path, given = params.get("path", ""), params.get("signature", "")
        operation = "write" if method == "POST" else "read"
        expiration_text = params.get("signature_expiration")
        expiration = int(expiration_text) if expiration_text and expiration_text.isdigit() else None
        if expiration_text is not None and expiration is None:
            raise SignatureRefused("invalid signature")
        if expiration is not None and expiration < time.time():
            raise SignatureRefused("signature is already expired")  # no need to try every sandbox
        for sandbox_id, live in list(self._live.items()):
            if live.handle.state not in ("running", CHECKPOINTING):  # the proxy waits for a checkpoint's end
                continue
            expected = file_signature(path, operation, params.get("username", ""), live.access_token, expiration)
            if hmac.compare_digest(expected.encode(), given.encode()):
                return sandbox_id
        raise SignatureRefused("invalid signature")

    def auto_resumes(self, sandbox_id: str) -> bool:
        """lifecycle.autoResume: traffic through the proxy resumes the paused sandbox."""
        live = self._live.get(sandbox_id)
        return bool(live and live.handle.details.get("autoResume"))

    def network(self, sandbox_id: str) -> NetworkPolicy:
        live = self._live.get(sandbox_id)
        return NetworkPolicy.from_dict(live.handle.details.get("network")) if live else NetworkPolicy()

    async def update_network(
        self,
        sandbox_id: str,
        allow_out: tuple[str, ...],
        deny_out: tuple[str, ...],
        dns_servers: tuple[str, ...],
        allow_internet: bool | None,
    ) -> SandboxRow:
        """Replace the outbound rules of a sandbox (running or paused); omitted rules are cleared."""
        self.get(sandbox_id)
        live = self._live[sandbox_id]
        async with live.lock:
            row = self.get(sandbox_id)
            network = self.network(sandbox_id).with_egress(allow_out, deny_out, dns_servers)
            on_disk = _on_disk(live.handle)  # then its next boot applies them
            if not on_disk:
                await self.backend.set_egress(live.handle, network.allow_cidrs, cidrs(deny_out))
            changes: dict[str, Any] = {}
            if allow_internet is not None and allow_internet != row.allow_internet:
                if not on_disk:
                    await self.backend.set_internet(live.handle, allow_internet)
                changes["allow_internet"] = allow_internet
            live.handle.details["network"] = network.to_dict()
            if not on_disk:
                await self._sync_intercept(live.handle)
            row = await self._update_row(sandbox_id, handle=live.handle.to_dict(), **changes) or row
        await self._store(
            repo.audit, row.api_key_id, "sandbox.network", sandbox_id, allowOut=list(allow_out), denyOut=list(deny_out)
        )
        return row

    async def settled(self, sandbox_id: str) -> None:
        """Return once the sandbox is not being checkpointed (its lock, held throughout, is free)."""
        live = self._live.get(sandbox_id)
        if live is not None and live.handle.state == CHECKPOINTING:
            async with live.lock:
                pass

    def address(self, sandbox_id: str) -> tuple[str, str] | None:
        """(address, state) of a live sandbox, for the proxy."""
        live = self._live.get(sandbox_id)
        if live is None:
            return None
        return live.handle.address, live.handle.state

    # --- connect / timeout / pause ------------------------------------------------------

    async def connect(self, sandbox_id: str, timeout_s: int | None) -> tuple[SandboxRow, bool]:
        """Resume if paused; extend the end time. Returns (row, resumed)."""
        row = self.get(sandbox_id)
        live = self._live[sandbox_id]
        resumed = False
        async with live.lock:
            row = self.get(sandbox_id)
            now = self.clock()
            if row.state == "paused":
                if _on_disk(live.handle):
                    live.handle = await self._boot_from_disk(row, live.handle)
                else:
                    await self.backend.resume(live.handle)
                live.handle.state = "running"
                # Auto-paused at its timeout, a sandbox has 0 s left: give it a fresh default timeout.
                remaining = row.paused_remaining_s or DEFAULT_TIMEOUT_S
                end_at = now + timedelta(seconds=remaining)
                if timeout_s is not None:
                    end_at = now + timedelta(seconds=self._check_timeout(timeout_s))
                # The lifetime limit counts running time: a resumed sandbox starts a new run.
                row = (
                    await self._update_row(
                        sandbox_id,
                        state="running",
                        started_at=now,
                        end_at=end_at,
                        paused_remaining_s=None,
                        handle=live.handle.to_dict(),
                        outbox=[_event("resumed", row, None)],
                    )
                    or row
                )
                resumed = True
            elif timeout_s is not None:
                end_at = max(row.end_at, now + timedelta(seconds=self._check_timeout(timeout_s)))
                end_at = min(end_at, row.started_at + timedelta(seconds=self.limits.max_timeout_s))
                row = await self._update_row(sandbox_id, end_at=end_at) or row
        self._reaper_wakeup.set()
        if resumed:
            self.events_written()
        return row, resumed

    def set_timeout(self, sandbox_id: str, timeout_s: int) -> SandboxRow:
        row = self.get(sandbox_id)
        timeout_s = self._check_timeout(timeout_s)
        if row.state == "paused":
            row = repo.update_sandbox(self.db, sandbox_id, paused_remaining_s=float(timeout_s)) or row
        else:
            end_at = min(
                self.clock() + timedelta(seconds=timeout_s),
                row.started_at + timedelta(seconds=self.limits.max_timeout_s),
            )
            row = repo.update_sandbox(self.db, sandbox_id, end_at=end_at) or row
        self._reaper_wakeup.set()
        return row

    async def pause(self, sandbox_id: str, reason: str | None = None, memory: bool = True) -> SandboxRow:
        """Freeze the sandbox (``memory``; on a tier that checkpoints, save it to disk), or keep
        only its files and end its processes: it then holds no memory, survives restarts of the
        stack and the host, and boots afresh on resume. ``Lost`` when a failed save ended it."""
        try:
            return await self._pause(sandbox_id, reason, memory)
        except Lost as lost:
            await self._bury_lost(sandbox_id, lost)
            raise

    async def _pause(self, sandbox_id: str, reason: str | None, memory: bool) -> SandboxRow:
        row = self.get(sandbox_id)
        live = self._live[sandbox_id]
        async with live.lock:
            row = self.get(sandbox_id)
            if row.state == "paused":
                raise Conflict(f"sandbox '{sandbox_id}' is already paused")
            if memory and self._checkpoints(live.handle):
                try:
                    live.handle = await self._pause_to_disk(live.handle, memory=True)
                except Conflict as exc:  # connections gVisor cannot save: memory stays in RAM
                    log.warning("paused in memory, not to disk", extra={"sandbox_id": sandbox_id, "error": exc.message})
                    await self.backend.pause(live.handle)
                else:
                    await self.egress.stop(sandbox_id)
            elif memory:
                await self.backend.pause(live.handle)
            else:
                await self.egress.stop(sandbox_id)
                live.handle = await self._pause_to_disk(live.handle)
            live.handle.state = "paused"
            for listener in self.pause_listeners:
                listener(sandbox_id)
            remaining = max(0.0, (row.end_at - self.clock()).total_seconds())
            row = (
                await self._update_row(
                    sandbox_id,
                    state="paused",
                    paused_remaining_s=remaining,
                    handle=live.handle.to_dict(),
                    outbox=[_event("paused", row, reason)],
                )
                or row
            )
        self.events_written()
        return row

    # --- kill ---------------------------------------------------------------------------

    async def kill(self, sandbox_id: str, reason: str = "killed", actor: str = "api") -> None:
        live = self._live.get(sandbox_id)
        if live is None:
            self.get(sandbox_id)  # its NotFound, naming the cause of one that died
            raise NotFound(f"sandbox '{sandbox_id}' not found")
        # Under the sandbox's lock, so a pause or resume in flight cannot write its state back after this.
        async with live.lock:
            if self._live.get(sandbox_id) is not live:  # a concurrent kill won
                raise NotFound(f"sandbox '{sandbox_id}' not found")
            del self._live[sandbox_id]
            kind = "timeout" if reason == "timeout" else "killed"
            event = lifecycle_event(kind, sandbox_id, live.template_id, live.metadata, reason, source=EVENT_SOURCE)
            # State, event and audit row in one write (a live sandbox's row is live: no read first).
            await self._store(
                repo.set_sandbox,
                sandbox_id,
                state="killed",
                killed_at=self.clock(),
                kill_reason=reason,
                outbox=[event],
                audit=repo.AuditEntry(actor, "sandbox.kill", sandbox_id, {"reason": reason}),
            )
        for listener in self.kill_listeners:
            listener(sandbox_id)
        metrics.SANDBOXES_ACTIVE.set(len(self._live))
        self._update_memory_metric()
        await self.egress.stop(sandbox_id)
        # Teardown (netns deletion alone takes ~30 ms) runs off the request path.
        self._ending[sandbox_id] = live
        self._spawn(self._end(sandbox_id, live))
        self.events_written()

    async def _end(self, sandbox_id: str, live: _Live) -> None:
        try:
            await self._destroy_and_forget(live.handle)
        finally:
            self._ending.pop(sandbox_id, None)
        for listener in self.end_listeners:
            try:
                await listener(live.template_id)
            except Exception:
                log.exception("a listener of sandbox ends failed", extra={"sandbox_id": sandbox_id})

    def in_use(self) -> tuple[set[str], set[str]]:
        """The template ids and the layer dirs of every sandbox that lives (running or paused) or
        is still being torn down: what no collection of snapshots may remove."""
        lives = [*self._live.values(), *self._ending.values()]
        layers = {str(layer) for live in lives for layer in live.handle.details.get("layers") or ()}
        return {live.template_id for live in lives}, layers

    async def _destroy_and_forget(self, handle: SandboxHandle) -> None:
        """A killed sandbox's end: its processes and mounts, then the files it was paused with."""
        if not _on_disk(handle):
            await self._destroy_quietly(handle)
        if self.paused_dir is not None:
            try:
                await asyncio.to_thread(remove_tree, self.paused_dir / handle.sandbox_id)
            except Exception:
                log.exception("files of a sandbox paused to disk not removed", extra={"sandbox_id": handle.sandbox_id})

    async def _destroy_quietly(self, handle: SandboxHandle) -> None:
        try:
            await self.backend.destroy(handle)
        except Exception:
            log.exception("sandbox teardown failed", extra={"sandbox_id": handle.sandbox_id})

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- timeouts -----------------------------------------------------------------------

    async def _reaper(self) -> None:
        while True:
            # Cleared before the pass and the deadline unknown during it: a create meanwhile wakes the next pass.
            self._reaper_wakeup.clear()
            self._next_deadline = None
            next_deadline = self._next_deadline = await self.reap()
            wait = 5.0 if next_deadline is None else min(5.0, max(0.01, (next_deadline - self.clock()).total_seconds()))
            await wait_event(self._reaper_wakeup, wait)

    async def reap(self) -> datetime | None:
        """End (kill, or pause if auto_pause) every running sandbox past its end time; return the
        next end time among the others (None: no running sandbox)."""
        now = self.clock()
        next_deadline: datetime | None = None
        for row in await self._store(repo.live_sandboxes):
            if row.state != "running" or row.sandbox_id not in self._live:
                continue
            if row.end_at <= now:
                try:
                    if row.auto_pause:
                        memory = self._live[row.sandbox_id].handle.details.get("autoPauseMemory", True)
                        await self.pause(row.sandbox_id, reason="timeout", memory=bool(memory))
                    else:
                        await self.kill(row.sandbox_id, reason="timeout", actor="system")
                except SandboxError as exc:  # a kill or pause by a client won the race
                    log.info(
                        "expired sandbox already ended", extra={"sandbox_id": row.sandbox_id, "error": exc.message}
                    )
                except Exception:
                    log.exception("could not end an expired sandbox", extra={"sandbox_id": row.sandbox_id})
            elif next_deadline is None or row.end_at < next_deadline:
                next_deadline = row.end_at
        return next_deadline

    # --- metrics ------------------------------------------------------------------------

    async def stats(self, sandbox_id: str) -> SandboxStats:
        row = self.get(sandbox_id)
        handle = self._live[sandbox_id].handle
        if _on_disk(handle):  # no processes: nothing runs, nothing is held but its files
            return SandboxStats(row.cpu_count, 0.0, 0, row.memory_mb * 1024 * 1024, 0, row.disk_mb * 1024 * 1024)
        return await self.backend.stats(handle)

    def samples(self, sandbox_id: str) -> list[dict[str, Any]]:
        self.get(sandbox_id)
        return list(self._live[sandbox_id].samples)

    async def sample_now(self, sandbox_id: str) -> dict[str, Any]:
        stats = await self.stats(sandbox_id)
        sample = _sample(stats)
        live = self._live.get(sandbox_id)
        if live is not None:
            live.samples.append(sample)
            del live.samples[:-METRICS_KEEP]
        self._update_memory_metric()
        return sample

    def _update_memory_metric(self) -> None:
        metrics.set_memory_quantiles([live.samples[-1]["memUsed"] for live in self._live.values() if live.samples])

    async def bury_dead(self) -> list[str]:
        """Kill (reason ``died``, with its ``killed`` event) every running sandbox whose envd is
        gone for good: its processes are all gone, or envd's port refused ``ENVD_GONE_CHECKS``
        passes in a row (other processes may live on). The template's envd launcher restarts a dead
        envd within a second or so; when it cannot (no /init yet, too many deaths, the launcher
        itself killed) nothing else would notice. Returns their ids."""
        running = [(i, live) for i, live in self._live.items() if live.handle.state == "running"]
        verdicts = await asyncio.gather(*(self._envd_gone(i, live.handle) for i, live in running))
        dead: list[str] = []
        for (sandbox_id, _), gone in zip(running, verdicts, strict=True):
            if not gone:
                continue
            log.warning("sandbox died: its envd is gone", extra={"sandbox_id": sandbox_id})
            self._refused.pop(sandbox_id, None)
            try:
                await self.kill(sandbox_id, reason="died", actor="system")
            except SandboxError:  # a caller killed it meanwhile
                continue
            self._remember_death(sandbox_id, DIED)
            dead.append(sandbox_id)
        for sandbox_id in set(self._refused) - set(self._live):
            del self._refused[sandbox_id]
        return dead

    def _remember_death(self, sandbox_id: str, why: str) -> None:
        self._died[sandbox_id] = why
        while len(self._died) > DIED_KEEP:
            del self._died[next(iter(self._died))]

    async def _bury_lost(self, sandbox_id: str, lost: Lost) -> None:
        """A sandbox an operation ended (``Lost``): killed as died, its cause kept for later answers."""
        try:
            await self.kill(sandbox_id, reason="died", actor="system")
        except SandboxError:  # a caller killed it meanwhile
            return
        self._remember_death(sandbox_id, f"it ended: {lost.message}")

    async def _envd_gone(self, sandbox_id: str, handle: SandboxHandle) -> bool:
        if not await self.backend.is_alive(handle):
            return True
        if await self.envd.listening(handle.address) is False:
            self._refused[sandbox_id] = self._refused.get(sandbox_id, 0) + 1
        else:  # answering, or too busy to say: not dead
            self._refused.pop(sandbox_id, None)
        return self._refused.get(sandbox_id, 0) >= ENVD_GONE_CHECKS

    async def _sampler(self) -> None:
        while True:
            try:
                await self.bury_dead()
            except Exception:
                log.exception("checking for dead sandboxes failed")
            for sandbox_id, live in list(self._live.items()):
                if live.handle.state != "running":
                    continue
                with contextlib.suppress(Exception):
                    await self.sample_now(sandbox_id)
            await asyncio.sleep(5)


ON_DISK = "pausedToDisk"  # handle detail of a sandbox paused to disk (without memory, or checkpointed)
MEMORY_IMAGE = "memoryImage"  # its checkpoint's dir, when paused with memory on a tier that checkpoints
_KEPT_ON_DISK = ("network", "autoResume", "autoPauseMemory", "runtime")  # details its next boot needs


def _write_secret(path: Path, secret: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(fd, "w") as out:
        out.write(secret)


def _on_disk(handle: SandboxHandle) -> bool:
    return bool(handle.details.get(ON_DISK))


def _event(kind: str, row: SandboxRow, reason: str | None) -> dict[str, Any]:
    """The envelope of ``e2b.sandbox.<kind>.v1`` about ``row``, to store with the state change."""
    return lifecycle_event(kind, row.sandbox_id, row.template_id, row.metadata_ or {}, reason, source=EVENT_SOURCE)


def _sample(stats: SandboxStats) -> dict[str, Any]:
    now = repo.utcnow()
    return {
        "timestamp": now.isoformat(),
        "timestampUnix": int(now.timestamp()),
        "cpuCount": stats.cpu_count,
        "cpuUsedPct": round(stats.cpu_used_pct, 2),
        "memUsed": stats.mem_used_bytes,
        "memTotal": stats.mem_total_bytes,
        "memCache": 0,
        "diskUsed": stats.disk_used_bytes,
        "diskTotal": stats.disk_total_bytes,
    }


def template_dir_loader(templates_dir: Path) -> TemplateLoader:
    """Adapter from the template store to ``TemplateLoader`` (unknown names raise KeyError)."""

    def load(name: str) -> TemplateImage:
        try:
            return load_template(name, templates_dir)
        except TemplateNotFound as exc:
            raise KeyError(str(exc)) from exc

    return load


async def destroy_all_sandboxes(db: Database, backend: Backend) -> int:
    """Kill every sandbox recorded as live and every remain (used by `pmoves-e2b down`); sandboxes
    paused to disk are kept (files only) for the next start.

    Runs while e2b-sandbox is stopped: the service itself keeps sandboxes alive across restarts.
    """
    rows = [r for r in repo.live_sandboxes(db) if not (r.handle and _on_disk(SandboxHandle.from_dict(r.handle)))]
    for row in rows:
        if row.handle:
            try:
                await backend.destroy(SandboxHandle.from_dict(row.handle))
            except Exception:
                log.exception("sandbox teardown failed", extra={"sandbox_id": row.sandbox_id})
        # Sent by the next e2b-sandbox that starts (or whichever relay reaches the store first).
        repo.update_sandbox(
            db,
            row.sandbox_id,
            state="killed",
            killed_at=repo.utcnow(),
            kill_reason="shutdown",
            outbox=[_event("killed", row, "shutdown")],
        )
    await backend.cleanup_orphans(set())
    backend.close()
    return len(rows)
