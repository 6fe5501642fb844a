"""Lifecycle events on the stack's NATS while the stock E2B SDK creates, pauses, resumes, kills and times out sandboxes."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import nats
import pytest
from e2b import AsyncSandbox
from events.nats_client import synced

from pmoves_e2b.events import envelope, schemas
from pmoves_e2b.events.envelope import Envelope

pytestmark = pytest.mark.stack

EVENT_TIMEOUT = 30.0


async def wait_for(
    events: list[Envelope], match: Callable[[Envelope], bool], timeout: float = EVENT_TIMEOUT
) -> Envelope:
    async with asyncio.timeout(timeout):
        while True:
            for event in events:
                if match(event):
                    return event
            await asyncio.sleep(0.05)


def test_lifecycle_events_for_create_pause_resume_kill_and_timeout(running_stack: Any) -> None:
    options = {
        "api_key": running_stack.api_key,
        "api_url": running_stack.sandbox_url,
        "sandbox_url": running_stack.sandbox_url,
    }
    marker = uuid.uuid4().hex

    async def scenario() -> None:
        client = await nats.connect(running_stack.nats_url)
        events: list[Envelope] = []

        async def collect(msg: Any) -> None:
            event = envelope.parse(msg.data, msg.subject)
            schemas.check_envelope(event, msg.subject)  # every event honours its contract
            events.append(event)

        await client.subscribe("e2b.sandbox.*.v1", cb=collect)
        await synced(client)
        sandbox = None
        try:
            sandbox = await AsyncSandbox.create(template="base", timeout=300, metadata={"test": marker}, **options)
            sid = sandbox.sandbox_id

            def of(kind: str, sandbox_id: str = sid) -> Callable[[Envelope], bool]:
                return lambda e: e.topic == f"e2b.sandbox.{kind}.v1" and e.payload["sandbox_id"] == sandbox_id

            created = await wait_for(events, of("created"))
            assert created.payload["metadata"].get("test") == marker and created.payload["template"]
            assert created.source == "e2b-sandbox"

            await sandbox.pause()
            await wait_for(events, of("paused"))
            resumed = await AsyncSandbox.connect(sid, **options)
            await wait_for(events, of("resumed"))
            await resumed.kill()
            killed = await wait_for(events, of("killed"))
            assert killed.payload.get("reason")
            sandbox = None

            short = await AsyncSandbox.create(template="base", timeout=2, metadata={"test": marker}, **options)
            expired = await wait_for(events, of("timeout", short.sandbox_id))
            assert expired.payload["reason"] == "timeout"
        finally:
            if sandbox is not None:
                await AsyncSandbox.kill(sandbox.sandbox_id, **options)
            await client.close()

    asyncio.run(scenario())
