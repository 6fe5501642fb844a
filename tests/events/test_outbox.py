"""No lifecycle event is lost: the outbox on the real embedded nats-server and a real SQLite store.

Events are stored with the state change (``store.repo``) and sent by ``OutboxRelay``: while the
server is down nothing is lost, once it is back they arrive in order; a process killed (-9)
between the write and the publish loses nothing either; a repeat after a crash keeps its id
and stream ``E2B`` keeps it once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import nats
import pytest
from events.embedded_nats import EmbeddedNats

from pmoves_e2b.config import Settings
from pmoves_e2b.events import envelope
from pmoves_e2b.events.connection import EventConnection, connect
from pmoves_e2b.events.embedded import CLIENT_USER, client_url
from pmoves_e2b.events.outbox import OutboxRelay, StoredEvent, lifecycle_event
from pmoves_e2b.events.publisher import STREAM_NAME, ensure_stream
from pmoves_e2b.store import repo
from pmoves_e2b.store.db import Database
from pmoves_e2b.store.models import SandboxRow

WAIT = 20.0


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    embedded = EmbeddedNats(tmp_path / "data")
    try:
        yield embedded
    finally:
        embedded.stop()


@pytest.fixture()
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'store.db'}")
    yield database
    database.close()


def sandbox_row(sandbox_id: str) -> SandboxRow:
    now = repo.utcnow()
    return SandboxRow(
        sandbox_id=sandbox_id,
        template_id="base",
        state="running",
        started_at=now,
        end_at=now + timedelta(seconds=300),
        cpu_count=1.0,
        memory_mb=512,
        disk_mb=1024,
        allow_internet=True,
        auto_pause=False,
        metadata_={"test": "outbox"},
        env_vars={},
        envd_access_token="t",
        api_key_id="k",
        handle={},
    )


def event(kind: str, sandbox_id: str, reason: str | None = None) -> dict[str, Any]:
    return lifecycle_event(kind, sandbox_id, "base", {"test": "outbox"}, reason, source="e2b-sandbox")


def create_and_kill(db: Database, sandbox_id: str) -> list[str]:
    """Two state changes, each committed with its event; returns the event ids in order."""
    created, killed = event("created", sandbox_id), event("killed", sandbox_id, "killed")
    repo.add_sandbox(db, sandbox_row(sandbox_id), outbox=[created])
    repo.update_sandbox(db, sandbox_id, state="killed", kill_reason="killed", outbox=[killed])
    return [created["id"], killed["id"]]


def relay_for(db: Database, connection: Any) -> OutboxRelay:
    return OutboxRelay(
        connection,
        pending=lambda n: [StoredEvent(seq, e) for seq, e in repo.pending_outbox(db, n)],
        delivered=lambda seqs: repo.delete_outbox(db, seqs),
    )


async def kept_ids(settings: Settings, expected: int) -> list[str]:
    """The ids of every ``e2b.sandbox.>`` event in stream E2B, read as PMOVES would (user pmoves)."""
    client = await nats.connect(client_url(settings, CLIENT_USER))
    try:
        js = client.jetstream(timeout=5)
        deadline = time.monotonic() + WAIT
        while True:
            info = await js.stream_info(STREAM_NAME)
            if info.state.messages >= expected or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        subscription = await js.pull_subscribe("e2b.sandbox.>", stream=STREAM_NAME)
        ids: list[str] = []
        while True:
            try:
                messages = await subscription.fetch(50, timeout=1)
            except TimeoutError:  # nats-py raises its own or asyncio's
                return ids
            for message in messages:
                ids.append(envelope.parse(message.data, message.subject).id)
                await message.ack()
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def relaying(
    server: EmbeddedNats, db: Database, stream_hook: Callable[[Any], Awaitable[None]] = ensure_stream
) -> AsyncIterator[tuple[EventConnection, OutboxRelay]]:
    """The server up, and a service's connection (``stream_hook`` on connect) with its running relay."""
    server.start()
    connection = connect(server.settings, "e2b-sandbox")
    connection.on_connect(stream_hook)
    relay = relay_for(db, connection)
    relay.start()
    try:
        yield connection, relay
    finally:
        await relay.stop()
        await connection.close()


async def delivered(db: Database) -> None:
    """Wait until the outbox is empty (every event confirmed by the server)."""
    async with asyncio.timeout(WAIT):
        while repo.pending_outbox(db, 100):
            await asyncio.sleep(0.05)


def test_events_made_while_nats_is_down_arrive_in_order_when_it_is_back(server: EmbeddedNats, db: Database) -> None:
    async def scenario() -> None:
        async with relaying(server, db) as (connection, relay):
            assert await connection.wait_connected(timeout=10)
            expected = create_and_kill(db, "before")
            relay.wake()
            await delivered(db)

            await asyncio.to_thread(server.stop)
            for n in range(5):
                expected += create_and_kill(db, f"down{n}")
                relay.wake()
            await asyncio.sleep(0.5)
            assert len(repo.pending_outbox(db, 100)) == 10  # nothing could be sent, nothing was dropped

            await asyncio.to_thread(server.start)
            await delivered(db)
            assert await kept_ids(server.settings, len(expected)) == expected  # all, in order, once

            # A second outage behaves the same (the stream and its order survive the restart).
            await asyncio.to_thread(server.stop)
            expected += create_and_kill(db, "again")
            await asyncio.to_thread(server.start)
            await delivered(db)
            assert await kept_ids(server.settings, len(expected)) == expected

    asyncio.run(scenario())


def test_a_repeat_after_a_crash_keeps_its_id_and_the_stream_keeps_it_once(server: EmbeddedNats, db: Database) -> None:
    async def scenario() -> None:
        server.start()
        connection = connect(server.settings, "e2b-sandbox")
        try:
            assert await connection.wait_connected(timeout=10)
            await ensure_stream(connection.client)
            expected = create_and_kill(db, "twice")
            # Sent, but the process "dies" before the rows are deleted: the next pass sends them again.
            passes: list[int] = []

            def one_pass(limit: int) -> list[StoredEvent]:
                passes.append(limit)
                return [] if len(passes) > 1 else [StoredEvent(seq, e) for seq, e in repo.pending_outbox(db, limit)]

            crashing = OutboxRelay(connection, pending=one_pass, delivered=lambda seqs: None)
            assert await crashing.drain() == 2
            assert await relay_for(db, connection).drain() == 2
            assert repo.pending_outbox(db, 10) == []
            assert await kept_ids(server.settings, 2) == expected
        finally:
            await connection.close()

    asyncio.run(scenario())


KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, sys.argv[3])
    from test_outbox import create_and_kill
    from pmoves_e2b.store.db import Database
    db = Database(sys.argv[1])
    ids = create_and_kill(db, sys.argv[2])
    print(" ".join(ids), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # after the commit, before anything is published
    """
)


def test_a_service_killed_between_write_and_publish_loses_nothing(
    server: EmbeddedNats, db: Database, tmp_path: Path
) -> None:
    url = str(db.engine.url)
    here = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, str(Path(here).parent), *sys.path])}
    done = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, url, "killed9", here], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    expected = done.stdout.split()
    assert [e["id"] for _, e in repo.pending_outbox(db, 10)] == expected

    async def scenario() -> None:
        async with relaying(server, db):  # the restarted service's relay
            await delivered(db)
            assert await kept_ids(server.settings, 2) == expected

    asyncio.run(scenario())


def test_events_written_while_the_stream_is_being_made_wait_for_it(server: EmbeddedNats, db: Database) -> None:
    """The connection is up before its on-connect hooks have made the stream: a pass in between
    would hand the events to a server with no stream to keep them (accepted, confirmed, lost)."""

    async def scenario() -> None:
        gate = asyncio.Event()

        async def slow_stream(client: Any) -> None:
            await gate.wait()
            await ensure_stream(client)

        async with relaying(server, db, slow_stream) as (connection, relay):
            assert await connection.wait_connected(timeout=10)
            expected = create_and_kill(db, "early")
            relay.wake()
            await asyncio.sleep(0.5)
            assert len(repo.pending_outbox(db, 10)) == 2  # kept until the stream exists
            gate.set()
            await delivered(db)
            assert await kept_ids(server.settings, 2) == expected

    asyncio.run(scenario())
