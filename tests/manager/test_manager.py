"""Unit tests of ``SandboxManager`` on a fake backend and a fake clock: no root, milliseconds each.

The stack tests (tests/compat, tests/stack) drive the same manager through the SDK on real
namespaces; these pin its own rules: limits, warm pool, reaper, the paused clock, re-adoption
and the failure paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest
from manager.fake_backend import FakeBackend
from sqlalchemy.orm import Session

from pmoves_e2b.sandbox.admission import BootGate
from pmoves_e2b.sandbox.backends.base import SandboxHandle, TemplateImage
from pmoves_e2b.sandbox.errors import BadRequest, Busy, Conflict, LimitReached, NotFound, SandboxError
from pmoves_e2b.sandbox.lifecycle import DEFAULT_TIMEOUT_S, CreateRequest, Limits, SandboxManager
from pmoves_e2b.sandbox.tiers import Tiers, TierStatus
from pmoves_e2b.store import repo
from pmoves_e2b.store.db import Database

T = TypeVar("T")
START = datetime(2026, 1, 1, 12, 0, tzinfo=repo.utcnow().tzinfo)


class FakeClock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)

    def monotonic(self) -> float:
        return (self.now - START).total_seconds()


@dataclass
class Env:
    db: Database
    backend: FakeBackend
    clock: FakeClock
    templates: dict[str, TemplateImage]
    sent: list[tuple[str, str, str | None]] = field(default_factory=list)

    @property
    def events(self) -> list[tuple[str, str, str | None]]:
        """(kind, sandbox id, reason) of the lifecycle events committed so far, in order: what the
        outbox relay sends (read here when a test looks, so the manager's own store calls stay the
        only ones during a test)."""
        pending = repo.pending_outbox(self.db, 1000)
        for _, event in pending:
            payload = event["payload"]
            self.sent.append((event["topic"].split(".")[2], payload["sandbox_id"], payload.get("reason")))
        repo.delete_outbox(self.db, [seq for seq, _ in pending])
        return self.sent

    def manager(
        self,
        limits: Limits | None = None,
        pool_size: int = 0,
        pool_max: int | None = None,
        boot_gate: BootGate | None = None,
        tiers: Tiers | None = None,
    ) -> SandboxManager:
        def events_written() -> None:
            pass  # the events wait in the outbox; ``events`` reads them

        def load(name: str) -> TemplateImage:
            if name not in self.templates:
                raise KeyError(f"template '{name}' not found")
            return self.templates[name]

        return SandboxManager(
            self.db,
            tiers or self.backend,
            load,
            limits or LIMITS,
            events_written,
            pool_size=pool_size,
            pool_templates=("base",) if pool_size else (),
            clock=self.clock,
            pool_max=pool_max,
            boot_gate=boot_gate,
            monotonic=self.clock.monotonic,
        )


LIMITS = Limits(max_sandboxes=3, memory_mb=512, cpu_count=1, max_timeout_s=3600)


def request(timeout_s: int | None = 60, auto_pause: bool = False, template: str = "base") -> CreateRequest:
    return CreateRequest(template, timeout_s, {"k": "v"}, {"A": "1"}, True, auto_pause, "key-1")


@contextlib.asynccontextmanager
async def started(env: Env, **kw: object) -> AsyncIterator[SandboxManager]:
    manager = env.manager(**kw)  # type: ignore[arg-type]
    await manager.start()
    try:
        yield manager
    finally:
        await manager.stop()


def run(tmp_path: Path, body: Callable[[Env], Awaitable[T]]) -> T:
    async def main() -> T:
        env = Env(
            Database(f"sqlite:///{tmp_path}/e2b.db"),
            FakeBackend(),
            FakeClock(),
            {"base": TemplateImage("base", ("/layers/base-1",))},
        )
        try:
            return await body(env)
        finally:
            await asyncio.sleep(0)  # background teardown tasks
            env.backend.close()
            env.db.close()

    return asyncio.run(main())


async def until(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


# --- limits ---------------------------------------------------------------------------------


def test_create_configures_envd_and_records_the_sandbox(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        async with started(env) as manager:
            row = await manager.create(request(timeout_s=60))
            assert row.state == "running"
            assert row.end_at == START + timedelta(seconds=60)
            (init,) = env.backend.envds[row.sandbox_id].inits
            assert init["envVars"] == {"A": "1"}
            assert init["accessToken"] == row.envd_access_token
            assert [r.sandbox_id for r in manager.list_rows()] == [row.sandbox_id]
            await until(lambda: ("created", row.sandbox_id, None) in env.events)

    run(tmp_path, body)


def test_a_template_with_nothing_to_start_is_configured_in_one_round_trip(tmp_path: Path) -> None:
    """/init is envd's readiness check too: no separate /health request, and an envd that listens
    only after the backend returned still gets its configuration."""

    async def body(env: Env) -> None:
        env.backend.listen_after = 0.3
        async with started(env) as manager:
            row = await manager.create(request())
            envd = env.backend.envds[row.sandbox_id]
            assert envd.paths == ["/init"]
            assert envd.inits[0]["accessToken"] == row.envd_access_token

    run(tmp_path, body)


def test_concurrent_creates_never_pass_the_sandbox_limit(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        async with started(env) as manager:
            results = await asyncio.gather(*(manager.create(request()) for _ in range(5)), return_exceptions=True)
            made = [r for r in results if not isinstance(r, BaseException)]
            refused = [r for r in results if isinstance(r, LimitReached)]
            assert len(made) == 3 and len(refused) == 2
            assert refused[0].status == 429 and "E2B_MAX_SANDBOXES" in refused[0].message
            await manager.kill(made[0].sandbox_id)
            await manager.create(request())  # a kill frees a slot

    run(tmp_path, body)


def test_the_limit_holds_when_the_store_is_slow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A create that finishes while another counts (a slow database) must still be counted: it
    once was in neither the count nor the reservations, and a 4th sandbox passed a limit of 3."""
    count = repo.live_totals

    def slow_count(db: Database) -> tuple[int, int]:
        live = count(db)
        time.sleep(0.05)  # the answer takes a while to come back; creates finish meanwhile
        return live

    monkeypatch.setattr(repo, "live_totals", slow_count)

    async def body(env: Env) -> None:
        async with started(env) as manager:
            first = [asyncio.create_task(manager.create(request())) for _ in range(3)]
            await asyncio.sleep(0)  # the three hold the reservations; later creates count meanwhile
            later = [asyncio.create_task(manager.create(request())) for _ in range(3)]
            results = await asyncio.gather(*first, *later, return_exceptions=True)
            made = [r for r in results if not isinstance(r, BaseException)]
            assert len(made) == 3, results
            assert all(isinstance(r, LimitReached) for r in results if isinstance(r, BaseException))

    run(tmp_path, body)


def test_memory_budget_refuses_the_create_that_would_pass_it(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        limits = Limits(max_sandboxes=10, memory_mb=512, cpu_count=1, max_timeout_s=3600, memory_budget_mb=1100)
        async with started(env, limits=limits) as manager:
            await manager.create(request())
            await manager.create(request())
            with pytest.raises(LimitReached, match="E2B_MEMORY_BUDGET_MB"):
                await manager.create(request())

    run(tmp_path, body)


def test_timeouts_over_the_lifetime_limit_are_refused(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        async with started(env) as manager:
            with pytest.raises(SandboxError, match="E2B_SANDBOX_TIMEOUT_SEC") as err:
                await manager.create(request(timeout_s=3601))
            assert err.value.status == 400
            row = await manager.create(request(timeout_s=60))
            env.clock.advance(3000)
            row = manager.set_timeout(row.sandbox_id, 3600)  # capped at started_at + max lifetime
            assert row.end_at == START + timedelta(seconds=3600)
            assert env.backend.created == [row.sandbox_id]  # the refused create started nothing

    run(tmp_path, body)


# --- reaper and the paused clock -------------------------------------------------------------


def test_reaper_kills_an_expired_sandbox(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        async with started(env) as manager:
            short = await manager.create(request(timeout_s=10))
            long = await manager.create(request(timeout_s=100))
            env.clock.advance(9)
            assert await manager.reap() == START + timedelta(seconds=10)
            env.clock.advance(2)
            assert await manager.reap() == START + timedelta(seconds=100)
            with pytest.raises(NotFound):
                manager.get(short.sandbox_id)
            manager.get(long.sandbox_id)
            await until(lambda: short.sandbox_id in env.backend.destroyed)
            await until(lambda: ("timeout", short.sandbox_id, "timeout") in env.events)
            dead = repo.get_sandbox(env.db, short.sandbox_id)
            assert dead is not None and dead.state == "killed" and dead.kill_reason == "timeout"

    run(tmp_path, body)


def test_auto_pause_at_timeout_then_resume_gets_a_fresh_default_timeout(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        async with started(env) as manager:
            row = await manager.create(request(timeout_s=10, auto_pause=True))
            env.clock.advance(11)
            assert await manager.reap() is None
            paused = manager.get(row.sandbox_id)
            assert paused.state == "paused" and paused.paused_remaining_s == 0
            assert row.sandbox_id in env.backend.paused
            env.clock.advance(10_000)
            await manager.reap()  # a paused sandbox is never reaped
            resumed, was_paused = await manager.connect(row.sandbox_id, None)
            assert was_paused and resumed.state == "running"
            assert resumed.end_at == env.clock.now + timedelta(seconds=DEFAULT_TIMEOUT_S)
            assert row.sandbox_id not in env.backend.paused

    run(tmp_path, body)


def test_pause_stops_the_clock(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        async with started(env) as manager:
            row = await manager.create(request(timeout_s=100))
            env.clock.advance(30)
            paused = await manager.pause(row.sandbox_id)
            assert paused.paused_remaining_s == 70
            with pytest.raises(Conflict):
                await manager.pause(row.sandbox_id)
            env.clock.advance(1000)
            await manager.reap()
            resumed, _ = await manager.connect(row.sandbox_id, None)
            assert resumed.end_at == env.clock.now + timedelta(seconds=70)
            assert resumed.started_at == env.clock.now  # the lifetime limit counts running time only
            await until(lambda: [e[0] for e in env.events] == ["created", "paused", "resumed"])

    run(tmp_path, body)


# --- re-adoption -----------------------------------------------------------------------------


def test_restart_readopts_live_sandboxes_and_buries_dead_ones(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        async with started(env) as first:
            alive = await first.create(request())
            paused = await first.create(request())
            await first.pause(paused.sandbox_id)
            dead = await first.create(request())
        env.backend.die(dead.sandbox_id)  # while the service was down
        async with started(env) as second:
            assert {r.sandbox_id for r in second.list_rows()} == {alive.sandbox_id, paused.sandbox_id}
            assert second.address(paused.sandbox_id) == (
                env.backend.envds[paused.sandbox_id].server.sockets[0].getsockname()[0],
                "paused",
            )
            await second.connect(paused.sandbox_id, None)
            with pytest.raises(NotFound):
                second.get(dead.sandbox_id)
            assert env.backend.orphan_calls[-1] == {alive.sandbox_id, paused.sandbox_id}
            assert ("killed", dead.sandbox_id, "lost") in env.events
            gone = repo.get_sandbox(env.db, dead.sandbox_id)
            assert gone is not None and gone.kill_reason == "lost"

    run(tmp_path, body)


def test_a_sandbox_whose_envd_died_is_killed_and_says_why(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        async with started(env) as manager:
            dead = await manager.create(request())
            alive = await manager.create(request())
            env.backend.die(dead.sandbox_id)  # envd, its first process, exited and took it along
            assert await manager.bury_dead() == [dead.sandbox_id]
            assert [r.sandbox_id for r in manager.list_rows()] == [alive.sandbox_id]
            with pytest.raises(NotFound, match="envd died"):
                manager.get(dead.sandbox_id)
            assert manager.death(dead.sandbox_id) is not None and manager.death(alive.sandbox_id) is None
            await until(lambda: ("killed", dead.sandbox_id, "died") in env.events)
            await until(lambda: dead.sandbox_id in env.backend.destroyed)  # its slot and mounts are freed
            row = repo.get_sandbox(env.db, dead.sandbox_id)
            assert row is not None and row.state == "killed" and row.kill_reason == "died"
            assert await manager.bury_dead() == []

    run(tmp_path, body)


def test_a_sandbox_whose_envd_stays_gone_is_killed_though_other_processes_live_on(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        async with started(env) as manager:
            row = await manager.create(request())
            other = await manager.create(request())
            env.backend.stop_envd(row.sandbox_id)
            assert await manager.bury_dead() == []  # a restart takes a moment: not yet
            assert await manager.bury_dead() == []
            assert await manager.bury_dead() == [row.sandbox_id]
            assert [r.sandbox_id for r in manager.list_rows()] == [other.sandbox_id]
            await until(lambda: ("killed", row.sandbox_id, "died") in env.events)

    run(tmp_path, body)


# --- warm pool -------------------------------------------------------------------------------


def test_create_claims_a_warm_sandbox_and_the_pool_refills(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        async with started(env, pool_size=1) as manager:
            await until(lambda: manager.pool.ready("base") == 1)
            warm = env.backend.created[0]
            row = await manager.create(request())
            assert row.sandbox_id == warm
            await until(lambda: len(env.backend.created) == 2)  # the filler replaced it
            assert env.backend.envds[warm].inits[0]["envVars"] == {"A": "1"}
        assert env.backend.created[1] in env.backend.destroyed  # stop() destroys the pool
        assert warm not in env.backend.destroyed  # user sandboxes outlive the service

    run(tmp_path, body)


def test_a_warm_sandbox_of_an_older_build_is_discarded(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        async with started(env, pool_size=1) as manager:
            await until(lambda: manager.pool.ready("base") == 1)
            stale = env.backend.created[0]
            env.templates["base"] = TemplateImage("base", ("/layers/base-2",))  # rebuilt
            row = await manager.create(request())
            assert row.sandbox_id != stale
            await until(lambda: stale in env.backend.destroyed)

    run(tmp_path, body)


def test_a_claimed_warm_sandbox_loses_internet_when_asked(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        async with started(env, pool_size=1) as manager:
            await until(lambda: manager.pool.ready("base") == 1)
            offline = request()
            offline.allow_internet = False
            row = await manager.create(offline)
            assert env.backend.internet[row.sandbox_id] is False

    run(tmp_path, body)


def test_the_pool_grows_after_a_burst_and_shrinks_when_idle(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        limits = Limits(max_sandboxes=10, memory_mb=512, cpu_count=1, max_timeout_s=3600)
        async with started(env, limits=limits, pool_size=1, pool_max=4) as manager:
            await until(lambda: manager.pool.ready("base") == 1)
            burst = await asyncio.gather(*(manager.create(request()) for _ in range(5)))
            # Five creates in the window: the pool now keeps four (its ceiling) warm for the next burst.
            await until(lambda: manager.pool.held()[0] == 4)
            await until(lambda: len(env.backend.created) == 5 + 4)  # all booted
            assert {r.sandbox_id for r in manager.list_rows()} == {r.sandbox_id for r in burst}
            hits = [await manager.create(request()) for _ in range(3)]
            assert all(r.sandbox_id in env.backend.created[:9] for r in hits)  # all warm, none booted for them
            env.clock.advance(61)  # a minute without creates
            manager.pool.wake()
            await until(lambda: manager.pool.held()[0] == 1)  # back to the floor
            await until(lambda: len(env.backend.destroyed) >= 3)
            live = {r.sandbox_id for r in manager.list_rows()}
            assert not live & set(env.backend.destroyed)  # only warm ones were let go

    run(tmp_path, body)


def test_warm_sandboxes_are_invisible_uncounted_and_grow_only_into_free_slots(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        limits = Limits(max_sandboxes=3, memory_mb=512, cpu_count=1, max_timeout_s=3600)
        async with started(env, limits=limits, pool_size=1, pool_max=5) as manager:
            await until(lambda: manager.pool.ready("base") == 1)
            rows = [await manager.create(request()) for _ in range(3)]  # the warm one does not count
            assert len(manager.list_rows()) == 3
            with pytest.raises(LimitReached):
                await manager.create(request())
            manager.pool.wake()
            await until(lambda: manager.pool.ready("base") == 1)
            await asyncio.sleep(0.05)
            # Demand is 4 creates, but every slot under E2B_MAX_SANDBOXES is taken: only the floor is kept.
            assert manager.pool.held()[0] == 1
            await manager.kill(rows[0].sandbox_id)
            assert [r.sandbox_id for r in manager.list_rows()] == [r.sandbox_id for r in rows[1:]]

    run(tmp_path, body)


def test_pool_growth_stays_within_the_memory_budget(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        limits = Limits(max_sandboxes=20, memory_mb=512, cpu_count=1, max_timeout_s=3600, memory_budget_mb=2048)
        async with started(env, limits=limits, pool_size=1, pool_max=8) as manager:
            await until(lambda: manager.pool.ready("base") == 1)
            await asyncio.gather(*(manager.create(request()) for _ in range(2)))
            manager.pool.wake()
            # 2 live x 512 MB + warm ones of 512 MB each within 2048 MB: two warm at most.
            await until(lambda: manager.pool.held() == (2, 1024))
            await asyncio.sleep(0.05)
            assert manager.pool.held() == (2, 1024)

    run(tmp_path, body)


def test_a_full_create_queue_answers_busy_at_once(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        limits = Limits(max_sandboxes=10, memory_mb=512, cpu_count=1, max_timeout_s=3600)
        gate = BootGate(1, queue_max=1, max_wait_s=30)
        async with started(env, limits=limits, boot_gate=gate) as manager:
            env.backend.hold = asyncio.Event()
            booting = asyncio.create_task(manager.create(request()))
            await until(lambda: gate.free_slots == 0)
            queued = asyncio.create_task(manager.create(request()))
            await until(lambda: gate.waiting_creates == 1)
            with pytest.raises(Busy) as refused:
                await manager.create(request())
            assert refused.value.status == 503 and refused.value.retry_after_s >= 1
            assert "E2B_CREATE_QUEUE" in refused.value.message
            env.backend.hold.set()
            first, second = await asyncio.gather(booting, queued)  # nobody failed for the others
            assert {first.state, second.state} == {"running"}
            assert len(manager.list_rows()) == 2

    run(tmp_path, body)


def test_a_create_that_waits_too_long_for_a_boot_slot_is_refused_and_frees_its_reservation(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        limits = Limits(max_sandboxes=2, memory_mb=512, cpu_count=1, max_timeout_s=3600)
        gate = BootGate(1, queue_max=8, max_wait_s=0.2)
        async with started(env, limits=limits, boot_gate=gate) as manager:
            env.backend.hold = asyncio.Event()
            booting = asyncio.create_task(manager.create(request()))
            await until(lambda: gate.free_slots == 0)  # the first create is booting
            with pytest.raises(Busy, match="E2B_CREATE_QUEUE_WAIT_SEC"):
                await manager.create(request())
            env.backend.hold.set()
            await booting
            await manager.create(request())  # the refused create's reservation is free again
            assert len(manager.list_rows()) == 2

    run(tmp_path, body)


# --- failure paths ---------------------------------------------------------------------------


def test_a_backend_failure_is_reported_and_frees_its_slot(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        limits = Limits(max_sandboxes=1, memory_mb=512, cpu_count=1, max_timeout_s=3600)
        async with started(env, limits=limits) as manager:
            env.backend.fail_create = "no space left for the upper dir"
            with pytest.raises(SandboxError, match="no space left") as err:
                await manager.create(request())
            assert err.value.status == 500
            await until(lambda: any(e[0] == "failed" for e in env.events))
            env.backend.fail_create = None
            await manager.create(request())  # the failed create's reservation was released

    run(tmp_path, body)


def test_a_sandbox_that_refuses_init_is_destroyed(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        async with started(env) as manager:
            env.backend.init_status = 500
            with pytest.raises(SandboxError, match="did not accept its configuration"):
                await manager.create(request())
            assert env.backend.destroyed == env.backend.created
            assert manager.list_rows() == []

    run(tmp_path, body)


def test_unknown_template_is_not_found(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        async with started(env) as manager:
            with pytest.raises(NotFound, match="template 'nope' not found"):
                await manager.create(request(template="nope"))
            assert env.backend.created == []

    run(tmp_path, body)


# --- the store off the event loop --------------------------------------------------------------


def test_create_and_reaper_reach_the_store_off_the_event_loop(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        loop_thread = threading.get_ident()
        on_loop: list[str] = []
        sessions = env.db.session

        @contextlib.contextmanager
        def watched() -> Iterator[Session]:
            if threading.get_ident() == loop_thread:
                on_loop.append("".join(traceback.format_stack(limit=4)))
            with sessions() as session:
                yield session

        async with started(env) as manager:
            env.db.session = watched  # type: ignore[method-assign]
            await manager.create(request(timeout_s=10))
            await manager.reap()
        assert on_loop == []

    run(tmp_path, body)


# --- snapshots -------------------------------------------------------------------------------


class ExportingBackend(FakeBackend):
    """A tier whose sandboxes can be snapshotted (files only)."""

    name = "exporting"

    async def export_filesystem(self, handle: SandboxHandle, dest: Path) -> None:
        dest.mkdir()


def test_a_snapshot_on_a_tier_without_it_names_the_available_tiers_that_can(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        statuses = [
            TierStatus("fake", "f", None),
            TierStatus("exporting", "e", None),
            TierStatus("absent", "a", "needs /dev/absent"),
        ]
        factories = {"fake": lambda: env.backend, "exporting": ExportingBackend, "absent": ExportingBackend}
        kinds = {"fake": lambda: FakeBackend, "exporting": lambda: ExportingBackend, "absent": lambda: ExportingBackend}
        async with started(env, tiers=Tiers("fake", statuses, factories, kinds)) as manager:
            row = await manager.create(request())
            with pytest.raises(BadRequest) as files_only:
                await manager.capture(row.sandbox_id, tmp_path / "layer", None)
            assert files_only.value.message == (
                "filesystem snapshots are not supported by this sandbox's isolation tier 'fake'; "
                "tiers here that can: exporting (choose one with metadata 'e2b.isolation')"
            )
            with pytest.raises(BadRequest) as with_memory:
                await manager.capture(row.sandbox_id, tmp_path / "layer", tmp_path / "image")
            assert with_memory.value.message == (
                "snapshots with memory (mode 'full', and forks) are not supported by this sandbox's isolation tier 'fake'"
            )
            assert not (tmp_path / "layer").exists()
            assert env.backend.paused == set()

    run(tmp_path, body)
