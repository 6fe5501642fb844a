"""e2b-mcp-server's e2b.spell.execute.v1 consumer: started in the service's lifespan, subscribed once NATS is up."""

from __future__ import annotations

import asyncio
import json
import socket

import nats
from fastapi.testclient import TestClient

from pmoves_e2b.config import load_settings
from pmoves_e2b.events import envelope
from pmoves_e2b.mcp.app import create_app


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ask(url: str, body: dict) -> envelope.Envelope:
    async def request() -> envelope.Envelope:
        client = await nats.connect(url)
        try:
            deadline = asyncio.get_running_loop().time() + 30
            while True:  # until the service has (re)connected and subscribed
                try:
                    reply = await client.request("e2b.spell.execute.v1", json.dumps(body).encode(), timeout=5)
                    return envelope.parse(reply.data, "reply")
                except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                    # no subscriber yet, or one still (re)subscribing when the request came: ask again
                    if asyncio.get_running_loop().time() > deadline:
                        raise
                    await asyncio.sleep(0.2)
        finally:
            await client.close()

    return asyncio.run(request())


def test_consumer_serves_requests_once_nats_comes_up_after_the_service(nats_server, tmp_path):
    nats_server.stop()  # the service starts while NATS is down
    settings = load_settings(
        e2b_data_dir=tmp_path,
        e2b_api_key="e2b_" + "d" * 40,
        e2b_mcp_server_token="t" * 64,
        e2b_sandbox_url=f"http://127.0.0.1:{closed_port()}",
        nats_url=nats_server.url,
        agent_zero_url=f"http://127.0.0.1:{closed_port()}",
    )
    with TestClient(create_app(settings)):
        nats_server.start()
        answer = ask(nats_server.url, {"request_id": "late-1", "spell_name": "no-such-spell"})
        assert answer.topic == "e2b.spell.failed.v1" and answer.source == "e2b-mcp-server"
        assert answer.correlation_id == "late-1" and answer.payload["code"] == "not_found"
        assert "no spell named 'no-such-spell'" in answer.payload["reason"]

        answer = ask(nats_server.url, {"request_id": "late-2", "spell_name": "sql-query", "parameters": {}})
        assert answer.payload["code"] == "invalid_parameters"
        assert "parameters: 'tables' is a required property" in answer.payload["reason"]
