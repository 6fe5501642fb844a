"""A finished session as the PMOVES paths answer it (``POST /surf/scrape``, MCP tools, NATS)."""

from __future__ import annotations

from typing import Any

from pmoves_e2b.surf.models import Session


def outcome(session: Session) -> dict[str, Any]:
    """Id, state, pages flat (the URL asked for, then what was extracted), result or error; agent: steps."""
    answer: dict[str, Any] = {
        "session_id": session.session_id,
        "state": session.state,
        "mode": session.mode,
        "url": session.request.get("url"),
        "page_count": len(session.pages or []),
        "pages": [{"url": page.url, **page.data} for page in session.pages or []],
        "result": session.result,
    }
    if session.mode == "agent":
        answer["steps"] = [step.model_dump(mode="json") for step in session.steps or []]
    if session.error is not None:
        answer["error"] = session.error
    return answer
