"""``POST /surf/scrape`` on e2b-mcp-server, as PMOVES' Agent Zero wrapper calls it.

Body as PMOVES sends it: ``{url, depth (2), extract_content (true), follow_links (false)}``; every
other option of e2b-surf's scrape mode (``max_pages``, ``same_origin``, ``formats``, ``timeout``)
is accepted too, and anything e2b-surf does not know is a 400 naming it. The run is a session of
e2b-surf (listed and watchable there); this route waits for it, at most ``SCRAPE_WAIT_S`` (PMOVES'
client gives up after 120 s), and answers 200 with the pages. Errors are ``{"error", "detail"}``:
400 bad request, 429 too many sessions, 502 the run failed (``session_id`` and the pages so far
included), 503 e2b-surf unreachable, 504 not done in time (the run is stopped).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from pmoves_e2b.surf.client import SurfApi, SurfClientError
from pmoves_e2b.surf.outcome import outcome

# Under the 120 s PMOVES' wrapper waits, so it gets our answer (or our 504), not its own timeout.
SCRAPE_WAIT_S = 110.0


def error_response(code: str, detail: str, status: int, **extra: Any) -> JSONResponse:
    # The run's own fields first: its ``error`` object gives way to the flat code and detail.
    return JSONResponse({**extra, "error": code, "detail": detail}, status_code=status)


def scrape_request(body: Any) -> dict[str, Any]:
    """The e2b-surf request for a PMOVES scrape body (ValueError says what is wrong)."""
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    if body.get("mode", "scrape") != "scrape":
        raise ValueError("mode: /surf/scrape only scrapes; use the surf_agent tool or e2b-surf's POST /api/surf")
    return {**body, "mode": "scrape"}


async def run_scrape(surf: SurfApi, request: dict[str, Any], wait_s: float) -> JSONResponse | dict[str, Any]:
    try:
        session = await surf.run(request, wait_s)
    except SurfClientError as exc:
        return error_response(exc.code, exc.detail, exc.status)
    answer = outcome(session)
    if session.state != "completed":
        error = session.error or {"code": session.state, "message": f"the run ended {session.state}"}
        return error_response(
            str(error.get("code") or session.state), str(error.get("message") or session.state), 502, **answer
        )
    return answer


def build_router(surf: SurfApi) -> APIRouter:
    router = APIRouter(tags=["surf"])

    @router.post(
        "/surf/scrape", summary="Scrape a web page (or crawl a site) in an e2b-surf session", response_model=None
    )
    async def scrape(request: Request) -> JSONResponse | dict[str, Any]:
        try:
            body = scrape_request(json.loads(await request.body() or b"null"))
        except ValueError as exc:  # also bad JSON and bad UTF-8
            detail = f"the body is not JSON ({exc.msg})" if isinstance(exc, json.JSONDecodeError) else str(exc)
            return error_response("invalid_request", detail, 400)
        return await run_scrape(surf, body, SCRAPE_WAIT_S)

    return router
