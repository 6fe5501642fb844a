"""Helpers for tests that talk to NATS with nats-py."""

from __future__ import annotations

from nats.aio.client import Client


async def synced(client: Client) -> None:
    """Return once the server has processed every command this client sent so far.

    nats-py's ``flush()`` writes its PING straight to the socket, ahead of SUB/PUB commands still
    queued for its flusher task, so one flush can return before the server saw a subscription made
    just before it (seen: a request published right after ``subscribe(); flush()`` reached no
    responder, 3 runs in 40). By the time the first PONG is back the flusher has run, so the second
    PING follows every earlier command.
    """
    await client.flush()
    await client.flush()
