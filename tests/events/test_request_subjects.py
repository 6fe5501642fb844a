"""Request subjects on a real nats-server: answers, request-reply, bad input, queue groups, JetStream."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import nats
import pytest

from pmoves_e2b.events import envelope
from pmoves_e2b.events.connection import EventConnection
from pmoves_e2b.events.envelope import Envelope
from pmoves_e2b.events.handlers import DurableEvents, RequestFailed, RequestServer, request_route
from pmoves_e2b.events.publisher import EventPublisher, ensure_stream

SPELL = request_route("e2b.spell.execute.v1")
REPLY_TIMEOUT = 5.0


def run_payload(name: str, result: Any = None) -> dict[str, Any]:
    return {
        "run_id": uuid.uuid4().hex,
        "spell_name": name,
        "spell_version": "1.0.0",
        "status": "completed",
        "exit_code": 0,
        "stdout": "",
        "stderr": "",
        "result": result,
        "files": [],
        "duration_seconds": 0.01,
    }


async def echo_spell(request: Envelope) -> dict[str, Any]:
    params = request.payload.get("parameters", {})
    if params.get("fail"):
        raise RequestFailed("execution_failed", "the spell said no", spell_name=request.payload["spell_name"])
    if params.get("crash"):
        raise RuntimeError("boom")
    if params.get("huge"):
        return run_payload(request.payload["spell_name"], {"blob": "x" * 2_000_000})
    return run_payload(request.payload["spell_name"], {"echo": params})


async def started(
    url: str,
    name: str,
    handler: Callable[[Envelope], Awaitable[dict[str, Any]]] = echo_spell,
) -> tuple[EventConnection, RequestServer]:
    connection = EventConnection(url, name)
    connection.start()
    assert await connection.wait_connected(5)
    server = RequestServer(connection, EventPublisher(connection, name), SPELL, handler)
    server.start()
    await _until(lambda: server._subscription is not None)
    return connection, server


async def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def stopped(*pairs: tuple[EventConnection, RequestServer]) -> None:
    for connection, server in pairs:
        await server.stop()
        await connection.close()


def reply_of(msg: Any) -> Envelope:
    return envelope.parse(msg.data, "reply")


def test_request_subject_names_follow_the_noun():
    assert (SPELL.completed, SPELL.failed, SPELL.queue) == (
        "e2b.spell.completed.v1",
        "e2b.spell.failed.v1",
        "e2b-spell",
    )
    assert request_route("e2b.desktop.request.v1").failed == "e2b.desktop.failed.v1"
    with pytest.raises(ValueError, match="not of the form"):
        request_route("spell")


def test_enveloped_and_flat_requests_are_answered_published_and_replied(nats_server):
    async def scenario() -> None:
        pair = await started(nats_server.url, "svc")
        client = await nats.connect(nats_server.url)
        published: list[Envelope] = []

        async def collect(msg: Any) -> None:
            published.append(envelope.parse(msg.data, msg.subject))

        await client.subscribe("e2b.spell.*.v1", cb=collect)
        try:
            enveloped = envelope.build(
                "e2b.spell.execute.v1",
                {"spell_name": "run-python", "parameters": {"a": 1}},
                "agent-zero",
                correlation_id="req-env",
            )
            answer = reply_of(await client.request(SPELL.request, enveloped.to_bytes(), timeout=REPLY_TIMEOUT))
            assert answer.topic == SPELL.completed and answer.correlation_id == "req-env"
            assert answer.parent_id == enveloped.id and answer.source == "svc"
            assert answer.payload["result"] == {"echo": {"a": 1}}

            flat = {"request_id": "req-flat", "agent_id": "agent-zero", "spell_name": "run-shell", "parameters": {}}
            answer = reply_of(await client.request(SPELL.request, json.dumps(flat).encode(), timeout=REPLY_TIMEOUT))
            assert answer.topic == SPELL.completed and answer.correlation_id == "req-flat"
            assert answer.payload["request_id"] == "req-flat" and answer.actor == "agent-zero"

            # A plain publish (no reply subject) is answered on the completed subject only.
            await client.publish(SPELL.request, json.dumps({**flat, "request_id": "req-pub"}).encode())
            await _until(lambda: any(e.correlation_id == "req-pub" for e in published))
            completed = [e for e in published if e.topic == SPELL.completed]
            assert sorted(e.correlation_id for e in completed) == ["req-env", "req-flat", "req-pub"]
        finally:
            await client.close()
            await stopped(pair)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("raw", "code", "words"),
    [
        (b"this is not json", "malformed_request", "not valid JSON"),
        (b"[1, 2]", "malformed_request", "must be a JSON object"),
        (
            json.dumps({"topic": "e2b.spell.execute.v1", "version": "v1", "payload": {}}).encode(),
            "malformed_request",
            "envelope is missing id, ts, source",
        ),
        (json.dumps({"request_id": "r-1", "parameters": {}}).encode(), "invalid_request", "'spell_name' is a required"),
        (
            json.dumps({"request_id": "r-2", "spell_name": "x", "parameters": "no"}).encode(),
            "invalid_request",
            "payload.parameters: 'no' is not of type 'object'",
        ),
        (
            json.dumps({"request_id": "r-3", "spell_name": "x", "parameters": {"fail": True}}).encode(),
            "execution_failed",
            "the spell said no",
        ),
        (
            json.dumps({"request_id": "r-4", "spell_name": "x", "parameters": {"crash": True}}).encode(),
            "internal_error",
            "RuntimeError: boom",
        ),
        (
            json.dumps({"request_id": "r-5", "spell_name": "x", "parameters": {"huge": True}}).encode(),
            "answer_too_large",
            "more than this NATS server's max_payload",
        ),
    ],
)
def test_bad_requests_get_failed_with_a_clear_reason(nats_server, raw, code, words):
    async def scenario() -> None:
        pair = await started(nats_server.url, "svc")
        client = await nats.connect(nats_server.url)
        failures: list[Envelope] = []

        async def collect(msg: Any) -> None:
            failures.append(envelope.parse(msg.data, msg.subject))

        await client.subscribe(SPELL.failed, cb=collect)
        try:
            answer = reply_of(await client.request(SPELL.request, raw, timeout=REPLY_TIMEOUT))
            assert answer.topic == SPELL.failed
            assert answer.payload["code"] == code and words in answer.payload["reason"]
            assert answer.payload["request_subject"] == SPELL.request
            await _until(lambda: len(failures) == 1)
            assert failures[0].id == answer.id  # the published failure is the reply
            if b"r-" in raw:
                assert answer.correlation_id == answer.payload["request_id"]
        finally:
            await client.close()
            await stopped(pair)

    asyncio.run(scenario())


def test_two_instances_in_a_queue_group_share_requests_without_duplicates(nats_server):
    served: Counter[str] = Counter()

    def counting(instance: str) -> Callable[[Envelope], Awaitable[dict[str, Any]]]:
        async def handler(request: Envelope) -> dict[str, Any]:
            served[instance] += 1
            await asyncio.sleep(0.01)
            return run_payload("run-python", {"instance": instance})

        return handler

    async def scenario() -> None:
        first = await started(nats_server.url, "svc-a", counting("a"))
        second = await started(nats_server.url, "svc-b", counting("b"))
        client = await nats.connect(nats_server.url)
        answers: Counter[str] = Counter()

        async def collect(msg: Any) -> None:
            answers[envelope.parse(msg.data, msg.subject).correlation_id or ""] += 1

        await client.subscribe(SPELL.completed, cb=collect)
        try:
            total = 40
            for n in range(total):
                body = {"request_id": f"q-{n}", "spell_name": "run-python", "parameters": {}}
                await client.publish(SPELL.request, json.dumps(body).encode())
            await _until(lambda: sum(answers.values()) >= total, timeout=10)
            await asyncio.sleep(0.2)  # any duplicate would arrive by now
            assert sum(answers.values()) == total and set(answers.values()) == {1}
            assert sum(served.values()) == total
            assert served["a"] > 0 and served["b"] > 0, served
        finally:
            await client.close()
            await stopped(first, second)

    asyncio.run(scenario())


def test_events_published_while_a_consumer_is_down_are_received_when_it_returns(nats_server):
    async def scenario() -> None:
        connection = EventConnection(nats_server.url, "e2b-sandbox")
        connection.start()
        assert await connection.wait_connected(5)
        await ensure_stream(connection.client)
        publisher = EventPublisher(connection, "e2b-sandbox")
        reader_client = await nats.connect(nats_server.url)
        durable = f"test-{uuid.uuid4().hex[:8]}"
        try:
            reader = DurableEvents(reader_client, durable, "e2b.sandbox.>")
            await reader.open()
            await publisher.publish_lifecycle("created", "sbx-0", "base")
            first = await reader.fetch(batch=10, timeout=2)
            assert [e.payload["sandbox_id"] for e in first] == ["sbx-0"]
            await reader.close()
            await reader_client.close()  # the consumer is down

            for n in range(1, 4):
                await publisher.publish_lifecycle("killed", f"sbx-{n}", "base", {"owner": "t"}, reason="killed by test")

            reader_client = await nats.connect(nats_server.url)
            back = DurableEvents(reader_client, durable, "e2b.sandbox.>")
            received: list[Envelope] = []
            async with asyncio.timeout(10):
                while len(received) < 3:
                    received += await back.fetch(batch=10, timeout=1)
            assert [e.payload["sandbox_id"] for e in received] == ["sbx-1", "sbx-2", "sbx-3"]
            assert all(e.topic == "e2b.sandbox.killed.v1" and e.payload["reason"] == "killed by test" for e in received)
            assert await back.fetch(batch=10, timeout=0.5) == []  # nothing delivered twice
            await back.close()
        finally:
            await reader_client.close()
            await connection.close()

    asyncio.run(scenario())
