"""Serving request subjects, and reading kept events back from JetStream.

A request subject ``e2b.<noun>.<verb>.v1`` is answered with ``e2b.<noun>.completed.v1`` or
``e2b.<noun>.failed.v1`` (published, so every listener sees it) and, when the request came
with a reply subject (NATS request-reply), the same envelope goes to the requester directly.
Every received request gets exactly one answer, never silence: a message that is not JSON,
not an envelope, or breaks the request's contract gets ``failed.v1`` with a reason naming
the problem. Requests may be contract envelopes or flat legacy objects (PMOVES documents
flat requests). Servers subscribe as a queue group, so several instances share the work and
each request is served once.

``RequestServer`` is generic: spells use it now, desktop and surf handlers reuse it with
their own subject and handler function.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from pmoves_e2b.events import envelope, schemas
from pmoves_e2b.events.connection import EventConnection
from pmoves_e2b.events.envelope import Envelope, EnvelopeError
from pmoves_e2b.events.publisher import STREAM_NAME, EventPublisher
from pmoves_e2b.observability.metrics import NATS_RECEIVED

log = logging.getLogger(__name__)

# Seconds a stopping server waits for requests in flight before answering them "unavailable".
STOP_GRACE_SECONDS = 5.0
# Room left in a NATS message for the envelope around an answer's payload.
ENVELOPE_OVERHEAD_BYTES = 4096


@dataclass(frozen=True)
class RequestRoute:
    """A request subject with its two answer subjects and the queue group that serves it."""

    request: str
    completed: str
    failed: str
    queue: str


def request_route(request_subject: str, queue: str | None = None) -> RequestRoute:
    """``e2b.spell.execute.v1`` -> answers ``e2b.spell.completed.v1`` / ``e2b.spell.failed.v1``."""
    parts = request_subject.split(".")
    if len(parts) < 3 or not parts[-1].startswith("v") or not all(parts):
        raise ValueError(f"request subject {request_subject!r} is not of the form <noun>.<verb>.v<N>")
    noun, version = ".".join(parts[:-2]), parts[-1]
    return RequestRoute(
        request=request_subject,
        completed=f"{noun}.completed.{version}",
        failed=f"{noun}.failed.{version}",
        queue=queue or noun.replace(".", "-"),
    )


class RequestFailed(Exception):
    """Raised by a handler: the request is answered with ``failed.v1`` (``extra`` joins the payload)."""

    def __init__(self, code: str, reason: str, **extra: Any) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.extra = extra


# Gets the validated request, returns the ``completed.v1`` payload or raises RequestFailed.
RequestHandler = Callable[[Envelope], Awaitable[dict[str, Any]]]


def request_id_of(message: Envelope) -> str:
    """The id answers carry as ``correlation_id``: the request's request_id, else its envelope id."""
    payload_id = message.payload.get("request_id")
    if isinstance(payload_id, str) and payload_id:
        return payload_id
    return message.correlation_id or message.id


def _request_id_from_raw(raw: bytes) -> str | None:
    """Best effort for malformed messages, so even their failure can be correlated."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    payload = data.get("payload")
    for source in (payload if isinstance(payload, dict) else {}, data):
        for key in ("request_id", "correlation_id"):
            if isinstance(source.get(key), str) and source[key]:
                return str(source[key])
    return None


@dataclass
class RequestServer:
    """Serves one request subject on a shared connection as a member of a queue group."""

    connection: EventConnection
    publisher: EventPublisher
    route: RequestRoute
    handler: RequestHandler
    max_concurrent: int = 4
    _subscription: Subscription | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _slots: asyncio.Semaphore | None = None

    def start(self) -> None:
        """Subscribe now if connected, else as soon as the connection is up (once: nats-py resubscribes)."""
        self._slots = asyncio.Semaphore(self.max_concurrent)
        self.connection.on_connect(self._subscribe)
        if self.connection.connected:
            asyncio.get_running_loop().create_task(self._subscribe(self.connection.client))

    async def _subscribe(self, client: Client) -> None:
        if self._subscription is not None:
            return
        self._subscription = await client.subscribe(self.route.request, queue=self.route.queue, cb=self._on_message)
        await client.flush(timeout=2)
        log.info("serving NATS requests", extra={"subject": self.route.request, "queue": self.route.queue})

    async def stop(self) -> None:
        if self._subscription is not None:
            try:
                await self._subscription.unsubscribe()
            except (nats.errors.Error, OSError):
                pass
            self._subscription = None
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=STOP_GRACE_SECONDS)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _on_message(self, msg: Msg) -> None:
        # nats-py runs callbacks of one subscription one after another: serve each in its own task.
        NATS_RECEIVED.labels(self.route.request).inc()
        task = asyncio.get_running_loop().create_task(self._serve(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, msg: Msg) -> None:
        if self._slots is None:
            raise RuntimeError("handler served a message before start()")
        request: Envelope | None = None
        try:
            request = self._parse(msg)
            async with self._slots:
                payload = await self.handler(request)
            payload = {**payload, "request_id": request_id_of(request)}
            too_large = self._oversize(payload)
            if too_large:
                raise RequestFailed("answer_too_large", too_large)
            await self._answer(msg, self.route.completed, payload, request)
        except RequestFailed as failure:
            await self._fail(msg, request, failure)
        except asyncio.CancelledError:
            await asyncio.shield(
                self._fail(
                    msg,
                    request,
                    RequestFailed("unavailable", "the service stopped before the request was finished; send it again"),
                )
            )
            raise
        except Exception as exc:  # never silence: an unexpected error still gets an answer
            log.exception("request handler failed", extra={"subject": self.route.request})
            await self._fail(msg, request, RequestFailed("internal_error", f"{type(exc).__name__}: {exc}"))

    def _parse(self, msg: Msg) -> Envelope:
        try:
            request = envelope.parse(msg.data, self.route.request)
        except EnvelopeError as exc:
            raise RequestFailed("malformed_request", f"malformed request on {self.route.request}: {exc}") from None
        try:
            schemas.check_envelope(request, self.route.request)
        except schemas.ContractError as exc:
            raise RequestFailed("invalid_request", f"invalid request: {exc}") from None
        return request

    async def _fail(self, msg: Msg, request: Envelope | None, failure: RequestFailed) -> None:
        request_id = request_id_of(request) if request is not None else _request_id_from_raw(msg.data)
        payload: dict[str, Any] = {
            **failure.extra,
            "code": failure.code,
            "reason": failure.reason,
            "request_subject": self.route.request,
        }
        if request_id is not None:
            payload["request_id"] = request_id
        log.info("request failed: %s", failure.reason, extra={"subject": self.route.request, "code": failure.code})
        bare: dict[str, Any] = {
            k: payload[k] for k in ("code", "reason", "request_subject", "request_id") if k in payload
        }
        if self._oversize(payload):
            payload = bare  # the extras (e.g. a run's output) do not fit in one NATS message
        try:
            await self._answer(msg, self.route.failed, payload, request)
        except schemas.ContractError:
            # Our own extra fields broke the contract: answer with the bare failure instead.
            log.exception("failure payload broke its contract")
            await self._answer(msg, self.route.failed, bare, request)

    def _oversize(self, payload: dict[str, Any]) -> str | None:
        """Why ``payload`` cannot travel in one NATS message, or None when it fits."""
        limit = self.connection.client.max_payload
        size = len(json.dumps(payload, separators=(",", ":"), default=str).encode())
        if not limit or size + ENVELOPE_OVERHEAD_BYTES <= limit:
            return None
        return (
            f"the answer is {size} bytes, more than this NATS server's max_payload ({limit}); "
            "ask for less output, or use the HTTP route for large results"
        )

    async def _answer(self, msg: Msg, subject: str, payload: dict[str, Any], request: Envelope | None) -> None:
        sent = await self.publisher.publish(
            subject,
            payload,
            correlation_id=payload.get("request_id"),
            parent_id=request.id if request is not None and not request.legacy else None,
            actor=request.actor if request is not None else None,
        )
        if msg.reply and sent is not None:
            try:
                await self.connection.client.publish(msg.reply, sent.to_bytes())
            except (nats.errors.Error, OSError) as exc:
                log.warning("could not send the reply: %s", exc, extra={"subject": subject})


class DurableEvents:
    """A durable JetStream consumer on stream ``E2B``: events kept while the reader was away.

    The consumer's position lives on the server under ``durable``, so a reader that comes
    back with the same name gets everything published since its last acknowledged event.
    Messages that break their contract are logged and acknowledged (skipped), not retried.
    """

    def __init__(self, client: Client, durable: str, filter_subject: str = "e2b.>") -> None:
        self.client = client
        self.durable = durable
        self.filter_subject = filter_subject
        self._subscription: Any = None

    async def open(self) -> None:
        js = self.client.jetstream(timeout=2)
        config = ConsumerConfig(
            durable_name=self.durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            filter_subject=self.filter_subject,
        )
        self._subscription = await js.pull_subscribe(
            self.filter_subject, durable=self.durable, stream=STREAM_NAME, config=config
        )

    async def fetch(self, batch: int = 10, timeout: float = 1.0) -> list[Envelope]:
        """Up to ``batch`` valid events (acknowledged); empty when none arrived within ``timeout``."""
        if self._subscription is None:
            await self.open()
        try:
            messages = await self._subscription.fetch(batch, timeout=timeout)
        except TimeoutError:  # nats-py raises its own (a subclass) or, under load, asyncio's from deeper in fetch
            return []
        events = []
        for msg in messages:
            NATS_RECEIVED.labels(msg.subject).inc()
            try:
                event = envelope.parse(msg.data, msg.subject)
                schemas.check_envelope(event, msg.subject)
                events.append(event)
            except (EnvelopeError, schemas.ContractError) as exc:
                log.warning("skipping an event that breaks its contract: %s", exc, extra={"subject": msg.subject})
            await msg.ack()
        return events

    async def close(self) -> None:
        """Stop reading; the durable position stays on the server."""
        if self._subscription is not None:
            await self._subscription.unsubscribe()
            self._subscription = None
