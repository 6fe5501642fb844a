"""No lifecycle event is lost on the real stack: NATS down, e2b-sandbox killed -9, `pmoves-e2b down`.

The supervisor is stopped (SIGSTOP) so the embedded nats-server stays down while the stock SDK
creates and kills sandboxes, then e2b-sandbox is killed -9 with those events still unsent; once
the supervisor runs again it restarts both and every event reaches stream ``E2B`` in order.
Sandboxes that `down` removes get their ``killed.v1`` (reason ``shutdown``) at the next `up`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import nats
import pytest
from e2b import AsyncSandbox

from pmoves_e2b.events import envelope
from pmoves_e2b.events.envelope import Envelope
from pmoves_e2b.events.publisher import STREAM_NAME

pytestmark = pytest.mark.stack

WAIT = 60.0


async def sandbox_events(nats_url: str, want: set[tuple[str, str]]) -> list[Envelope]:
    """Every ``e2b.sandbox.>`` event kept in stream E2B, once ``want`` (sandbox id, kind) are all there."""
    deadline = time.monotonic() + WAIT
    events: list[Envelope] = []
    while True:
        try:
            events = await read_stream(nats_url)
        except (nats.errors.Error, TimeoutError):  # the server is still starting
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)
            continue
        seen = {(e.payload["sandbox_id"], e.topic.split(".")[2]) for e in events}
        if want <= seen or time.monotonic() > deadline:
            return events
        await asyncio.sleep(0.5)


async def read_stream(nats_url: str) -> list[Envelope]:
    client = await nats.connect(nats_url)
    try:
        subscription = await client.jetstream(timeout=5).pull_subscribe("e2b.sandbox.>", stream=STREAM_NAME)
        events: list[Envelope] = []
        while True:
            try:
                messages = await subscription.fetch(100, timeout=1)
            except TimeoutError:  # nats-py raises its own or asyncio's
                return events
            events += [envelope.parse(m.data, m.subject) for m in messages]
    finally:
        await client.close()


def kinds_of(events: list[Envelope], sandbox_id: str) -> list[str]:
    return [e.topic.split(".")[2] for e in events if e.payload["sandbox_id"] == sandbox_id]


def wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[0]
        except OSError:
            return
        if state == "Z":
            return
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} did not die")


def test_no_lifecycle_event_is_lost_while_nats_is_down_or_the_service_is_killed(stack_factory: Any) -> None:
    stack = stack_factory({"E2B_POOL_SIZE": "0"})
    options = {"api_key": stack.api_key, "api_url": stack.sandbox_url, "sandbox_url": stack.sandbox_url}
    supervisor = stack.service_pid("supervisor")
    nats_pid = stack.service_pid("nats")
    assert supervisor and nats_pid

    async def while_down() -> tuple[str, str]:
        first = await AsyncSandbox.create(template="base", timeout=300, **options)
        second = await AsyncSandbox.create(template="base", timeout=300, **options)
        await second.kill()
        await first.kill()
        return first.sandbox_id, second.sandbox_id

    os.kill(supervisor, signal.SIGSTOP)  # nothing restarts what we kill until SIGCONT
    try:
        os.kill(nats_pid, signal.SIGKILL)
        wait_gone(nats_pid)
        first, second = asyncio.run(while_down())
        sandbox_pid = stack.service_pid("sandbox")
        assert sandbox_pid is not None
        os.kill(sandbox_pid, signal.SIGKILL)  # events written, never published
        wait_gone(sandbox_pid)
    finally:
        os.kill(supervisor, signal.SIGCONT)
    stack.wait_healthy(timeout=90)

    want = {(first, "created"), (first, "killed"), (second, "created"), (second, "killed")}
    events = asyncio.run(sandbox_events(stack.nats_url, want))
    assert kinds_of(events, second) == ["created", "killed"]
    assert kinds_of(events, first) == ["created", "killed"]
    ids = [e.id for e in events]
    assert len(ids) == len(set(ids))
    # In the order the state changes were made: first created, second created, second killed, first killed.
    order = [
        (e.payload["sandbox_id"], e.topic.split(".")[2]) for e in events if e.payload["sandbox_id"] in (first, second)
    ]
    assert order == [(first, "created"), (second, "created"), (second, "killed"), (first, "killed")]

    # A sandbox that `down` removes is reported killed (reason shutdown) once the stack is back.
    async def make_one() -> str:
        return (await AsyncSandbox.create(template="base", timeout=300, **options)).sandbox_id

    third = asyncio.run(make_one())
    assert stack.down().returncode == 0
    stack.up()
    events = asyncio.run(sandbox_events(stack.nats_url, {(third, "killed")}))
    [killed] = [e for e in events if e.payload["sandbox_id"] == third and e.topic == "e2b.sandbox.killed.v1"]
    assert killed.payload["reason"] == "shutdown"
