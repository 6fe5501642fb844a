"""Durable events: written to the store's outbox with the state change, sent by a relay.

A lifecycle event is built (``lifecycle_event``: stable envelope id and time, contract checked) by
the code that changes the state and stored in the same database transaction as that change
(``store.repo``: the ``event_outbox`` table). ``OutboxRelay`` sends what is stored, oldest first,
whenever it is told that something was written (what the next 20 ms bring goes in the same pass),
once NATS is (re)connected and its on-connect hooks made the stream, and every second (rows written
by another process, e.g. ``pmoves-e2b down``). A row is deleted only after the server confirmed the
batch (flush), so delivery is at least once: after a crash between publish and delete the same
envelope (same ``id``) is sent again. Each message carries ``Nats-Msg-Id`` = the envelope id, so
stream ``E2B`` drops such a repeat within its duplicate window, and any consumer can drop it by
``id``. The relay stops at the first failure, so order is kept.

This module speaks NATS only; the store is reached through the two functions it is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import nats

from pmoves_e2b.events import envelope, schemas, subjects
from pmoves_e2b.events.connection import EventConnection
from pmoves_e2b.observability.metrics import NATS_PUBLISH_FAILED, NATS_PUBLISHED

log = logging.getLogger(__name__)

BATCH = 100
POLL_SECONDS = 1.0
COALESCE_SECONDS = 0.02
MSG_ID_HEADER = "Nats-Msg-Id"


@dataclass(frozen=True)
class StoredEvent:
    """One outbox row: its position and the envelope as it will be sent."""

    seq: int
    event: dict[str, Any]


# pending(limit) -> the oldest unsent events; delivered(seqs) -> forget them. Both block (run in a thread).
PendingEvents = Callable[[int], Sequence[StoredEvent]]
DeliveredEvents = Callable[[Sequence[int]], None]


def lifecycle_payload(
    sandbox_id: str, template: str, metadata: dict[str, str] | None, reason: str | None
) -> dict[str, Any]:
    payload: dict[str, Any] = {"sandbox_id": sandbox_id, "template": template, "metadata": dict(metadata or {})}
    if reason is not None:
        payload["reason"] = reason
    return payload


def lifecycle_event(
    kind: subjects.LifecycleKind | str,
    sandbox_id: str,
    template: str,
    metadata: dict[str, str] | None,
    reason: str | None,
    *,
    source: str,
) -> dict[str, Any]:
    """The envelope of ``e2b.sandbox.<kind>.v1`` (as a dict, to be stored), checked against its contract."""
    topic = subjects.sandbox_lifecycle(kind)  # type: ignore[arg-type]  # checked at run time
    event = envelope.build(topic, lifecycle_payload(sandbox_id, template, metadata, reason), source)
    schemas.check_envelope(event)
    return event.to_dict()


class OutboxRelay:
    """Sends stored events on ``connection`` in order; one per process that writes them."""

    def __init__(self, connection: EventConnection, pending: PendingEvents, delivered: DeliveredEvents) -> None:
        self.connection = connection
        self.pending = pending
        self.delivered = delivered
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._waking: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.connection.on_connect(self._on_connect)
        self._task = asyncio.create_task(self._run(), name="event-outbox")
        self.wake()

    def wake(self) -> None:
        """Something was written: send it now (safe to call from any coroutine of the loop)."""
        self._wakeup.set()

    async def stop(self) -> None:
        """Stop; a last pass sends what it can (the rest waits in the store for the next start)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.drain(), 2)

    async def _on_connect(self, _: object) -> None:
        # Hooks run in order and the stream may not exist yet: wake once they are all done.
        self._waking = asyncio.create_task(self._wake_when_ready(), name="event-outbox-wake")

    async def _wake_when_ready(self) -> None:
        if await self.connection.wait_ready(POLL_SECONDS):
            self.wake()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), POLL_SECONDS)
                # Writes come in bursts (a create+kill writes two events): one pass sends what a few
                # ms bring, instead of a query, a publish and a delete for each. Not while not ready:
                # a pass then sends nothing.
                if self.connection.ready:
                    await asyncio.sleep(COALESCE_SECONDS)
            self._wakeup.clear()
            try:
                await self.drain()
            except Exception:  # the store or the bus failed this pass; the rows wait for the next
                log.exception("event outbox pass failed")

    async def drain(self) -> int:
        """Send every stored event while NATS takes them; returns how many were delivered."""
        sent_total = 0
        # Only once the on-connect hooks made the stream: before that the server would accept and
        # confirm the events with no stream to keep them, and the rows would be deleted (lost).
        while self.connection.ready:
            batch = await asyncio.to_thread(self.pending, BATCH)
            if not batch:
                break
            sent = await self._send(batch)
            if sent:
                await asyncio.to_thread(self.delivered, sent)
                sent_total += len(sent)
            if len(sent) < len(batch) or len(batch) < BATCH:
                break  # a short batch was all there was: what is written later wakes the next pass
        return sent_total

    async def _send(self, batch: Sequence[StoredEvent]) -> list[int]:
        client = self.connection.client
        published: list[StoredEvent] = []
        for item in batch:
            topic = str(item.event["topic"])
            try:
                data = json.dumps(item.event, separators=(",", ":"), default=str).encode()
                await client.publish(topic, data, headers={MSG_ID_HEADER: str(item.event["id"])})
            except (nats.errors.Error, OSError) as exc:
                NATS_PUBLISH_FAILED.labels(topic).inc()
                log.warning("event kept for later: %s", exc, extra={"subject": topic})
                break
            published.append(item)
        if not published:
            return []
        try:
            # Only what the server has confirmed leaves the outbox.
            await client.flush(timeout=2)
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            for item in published:
                NATS_PUBLISH_FAILED.labels(str(item.event["topic"])).inc()
            log.warning("events kept for later, the server did not confirm them: %s", exc)
            return []
        for item in published:
            NATS_PUBLISHED.labels(str(item.event["topic"])).inc()
        return [item.seq for item in published]
