"""Publishing enveloped events; the JetStream stream that keeps ``e2b.>`` events.

Stream ``E2B`` captures every ``e2b.>`` subject so events published while a consumer is
down are kept: retention ``limits``, at most 7 days and 1 GiB (oldest dropped first), file
storage. It is created with ``no_ack``: otherwise JetStream answers every NATS *request*
on an ``e2b.>`` subject with its own PubAck, racing the real responder of request subjects
such as ``e2b.spell.execute.v1``. Messages are still stored; publishers use core publish.

Publishing never raises into the caller because of NATS: when NATS is down the event is
logged and counted (``nats_publish_failures_total``). A payload that breaks its subject's
contract (``contracts/``) raises ``ContractError``: that is a bug in the caller, not an outage.
"""

from __future__ import annotations

import logging
from typing import Any

import nats
from nats.aio.client import Client
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from pmoves_e2b.events import envelope, outbox, schemas, subjects
from pmoves_e2b.events.connection import EventConnection
from pmoves_e2b.observability.metrics import NATS_PUBLISH_FAILED, NATS_PUBLISHED

log = logging.getLogger(__name__)

STREAM_NAME = "E2B"
STREAM_SUBJECTS = ["e2b.>"]
STREAM_MAX_AGE_SECONDS = 7 * 24 * 3600
STREAM_MAX_BYTES = 1024**3


def stream_config() -> StreamConfig:
    return StreamConfig(
        name=STREAM_NAME,
        description="pmoves-e2b events (lifecycle, requests, results)",
        subjects=STREAM_SUBJECTS,
        retention=RetentionPolicy.LIMITS,
        max_age=STREAM_MAX_AGE_SECONDS,
        max_bytes=STREAM_MAX_BYTES,
        discard=DiscardPolicy.OLD,
        storage=StorageType.FILE,
        no_ack=True,
    )


async def ensure_stream(client: Client) -> None:
    """Create or update stream E2B; logs (does not raise) when the server has no JetStream."""
    js = client.jetstream(timeout=2)
    config = stream_config()
    try:
        try:
            await js.add_stream(config)
            log.info("JetStream stream ready", extra={"stream": STREAM_NAME})
        except nats.js.errors.BadRequestError:
            # Exists already (maybe created by another service at the same moment): apply our config.
            await js.update_stream(config)
    except (nats.errors.Error, TimeoutError) as exc:
        log.warning("JetStream stream %s not available: %s (events are published but not kept)", STREAM_NAME, exc)


class EventPublisher:
    """Publishes contract envelopes on a shared ``EventConnection`` as ``source``."""

    def __init__(self, connection: EventConnection, source: str) -> None:
        self.connection = connection
        self.source = source

    async def publish(
        self,
        topic: str,
        payload: dict[str, Any],
        *,
        correlation_id: str | None = None,
        parent_id: str | None = None,
        actor: str | None = None,
        labels: tuple[str, ...] | list[str] = (),
    ) -> envelope.Envelope | None:
        """Publish one event. Returns the envelope sent, or None when it could not be sent."""
        event = envelope.build(
            topic,
            payload,
            self.source,
            correlation_id=correlation_id,
            parent_id=parent_id,
            actor=actor,
            labels=labels,
        )
        schemas.check_envelope(event)
        if not self.connection.connected:
            self._dropped(topic, "not connected")
            return None
        try:
            await self.connection.client.publish(topic, event.to_bytes())
            await self.connection.client.flush(timeout=2)
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            self._dropped(topic, str(exc) or type(exc).__name__)
            return None
        NATS_PUBLISHED.labels(topic).inc()
        return event

    async def publish_lifecycle(
        self,
        kind: subjects.LifecycleKind,
        sandbox_id: str,
        template: str,
        metadata: dict[str, str] | None = None,
        reason: str | None = None,
        *,
        correlation_id: str | None = None,
    ) -> envelope.Envelope | None:
        """``e2b.sandbox.<kind>.v1`` with the sandbox id, template, metadata and reason."""
        payload = outbox.lifecycle_payload(sandbox_id, template, metadata, reason)
        return await self.publish(subjects.sandbox_lifecycle(kind), payload, correlation_id=correlation_id)

    def _dropped(self, topic: str, why: str) -> None:
        NATS_PUBLISH_FAILED.labels(topic).inc()
        log.warning("event not published: %s", why, extra={"subject": topic})
