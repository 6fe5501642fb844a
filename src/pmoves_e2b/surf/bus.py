"""``e2b.surf.request.v1`` on NATS: a queue-group consumer in e2b-surf's lifespan.

A request is the body of ``POST /api/surf`` (PMOVES' scrape payload ``{url, depth,
extract_content, follow_links}`` is one) plus ``request_id``. It becomes an e2b-surf session
(``created_by`` "nats": listed, watchable and stoppable like any other); when the session ends
the answer is ``e2b.surf.completed.v1`` with its pages (or steps and result), else
``e2b.surf.failed.v1``: a refused request (bad field 400, too many sessions 429: nothing ran)
or a run that failed, was stopped or timed out (``session`` holds what it got so far).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI

from pmoves_e2b.events.envelope import Envelope
from pmoves_e2b.events.handlers import RequestFailed, RequestHandler, RequestServer, request_route
from pmoves_e2b.surf.models import Session, SurfError, parse_request
from pmoves_e2b.surf.outcome import outcome
from pmoves_e2b.surf.sessions import FINAL_STATES, SessionManager

SURF_ROUTE = request_route("e2b.surf.request.v1", queue="e2b-surf")


async def run_to_end(sessions: SessionManager, fields: dict[str, Any]) -> Session:
    """Start a session for ``fields`` and return it, with steps and pages, once it ended."""
    session = await sessions.start(parse_request(fields), "nats")
    async for event in sessions.events(session.session_id):
        if event.get("type") == "state" and event.get("state") in FINAL_STATES:
            break
    return await sessions.get(session.session_id)


def surf_handler(sessions: SessionManager) -> RequestHandler:
    async def handle(request: Envelope) -> dict[str, Any]:
        fields = {k: v for k, v in request.payload.items() if k != "request_id"}  # checked by contracts/
        try:
            session = await run_to_end(sessions, fields)
        except SurfError as exc:
            raise RequestFailed(exc.code, exc.message) from None
        answer = outcome(session)
        if session.state != "completed":
            error = session.error or {}
            code = str(error.get("code") or session.state)
            reason = str(error.get("message") or f"surf session {session.session_id} ended {session.state}")
            raise RequestFailed(code, reason, session_id=session.session_id, session=answer)
        return answer

    return handle


@contextlib.asynccontextmanager
async def serve_surf(app: FastAPI, sessions: SessionManager, max_concurrent: int) -> AsyncIterator[None]:
    """Serve surf requests on the service's NATS connection (``app.state.events``) while the app runs."""
    server = RequestServer(
        app.state.events, app.state.publisher, SURF_ROUTE, surf_handler(sessions), max_concurrent=max_concurrent
    )
    server.start()
    try:
        yield
    finally:
        await server.stop()
