"""``e2b.spell.execute.v1`` on NATS: a queue-group consumer in e2b-mcp-server's lifespan.

Answers ``e2b.spell.completed.v1`` when the spell completed; ``e2b.spell.failed.v1`` when the
request was rejected (unknown spell, bad parameters: nothing ran) or the spell failed or timed
out (``run`` then holds its stdout, stderr and result).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI

from pmoves_e2b.events.envelope import Envelope
from pmoves_e2b.events.handlers import RequestFailed, RequestHandler, RequestServer, request_route
from pmoves_e2b.spells.executor import SpellError, SpellExecutor, SpellRequest

SPELL_ROUTE = request_route("e2b.spell.execute.v1", queue="e2b-spell")


def spell_handler(executor: SpellExecutor) -> RequestHandler:
    async def handle(request: Envelope) -> dict[str, Any]:
        payload = request.payload  # already checked against contracts/ (spell.execute.v1)
        name = payload["spell_name"]
        spell_request = SpellRequest(
            name, payload.get("parameters") or {}, payload.get("timeout"), payload.get("sandbox_id")
        )
        try:
            run = await executor.execute(spell_request)
        except SpellError as exc:
            raise RequestFailed(exc.code, exc.message, spell_name=name) from None
        if run["status"] != "completed":
            code = "timeout" if run["status"] == "timeout" else "execution_failed"
            raise RequestFailed(code, run["error"] or f"spell {name} failed", spell_name=name, run=run)
        return run

    return handle


@contextlib.asynccontextmanager
async def serve_spells(app: FastAPI, executor: SpellExecutor) -> AsyncIterator[None]:
    """Serve spell requests on the service's NATS connection (``app.state.events``) while the app runs."""
    server = RequestServer(app.state.events, app.state.publisher, SPELL_ROUTE, spell_handler(executor))
    server.start()
    try:
        yield
    finally:
        await server.stop()
