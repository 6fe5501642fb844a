"""A typed client of e2b-surf's sessions API (``Authorization: Bearer $E2B_SURF_AUTH_TOKEN``).

e2b-mcp-server runs its surf work through this, so every run, whoever asked for it, is a session
of e2b-surf: listed there, watchable live, stoppable. Errors come back as ``SurfClientError`` with
e2b-surf's ``{"error", "detail"}`` and status (503 ``surf_unavailable`` when it cannot be reached).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from pmoves_e2b.surf.models import Session

FINAL_STATES = ("completed", "failed", "stopped", "interrupted")
CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 30.0


class SurfClientError(Exception):
    """e2b-surf refused or failed a call: its error ``code``, ``detail`` and HTTP ``status``."""

    def __init__(self, code: str, detail: str, status: int) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.status = status


def _error_of(response: httpx.Response) -> SurfClientError:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return SurfClientError(body["error"], str(body.get("detail") or body["error"]), response.status_code)
    return SurfClientError("surf_error", f"e2b-surf answered {response.status_code}", response.status_code)


class SurfApi:
    """``start``/``get``/``list``/``stop``/``events``/``wait`` against one e2b-surf."""

    def __init__(self, base_url: str, token: str | None, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
            trust_env=False,  # e2b-surf is ours: never through an outside proxy
            transport=transport,
        )

    async def close(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise SurfClientError(
                "surf_unavailable", f"e2b-surf at {self.base_url} cannot be reached ({type(exc).__name__})", 503
            ) from None
        if response.status_code >= 400:
            raise _error_of(response)
        return response.json()

    async def start(self, request: dict[str, Any]) -> Session:
        """``POST /api/surf``: the new session (queued); e2b-surf checks the request strictly (400)."""
        return Session.model_validate(await self._call("POST", "/api/surf", json=request))

    async def get(self, session_id: str) -> Session:
        """The session with its steps and pages."""
        return Session.model_validate(await self._call("GET", f"/api/sessions/{session_id}"))

    async def list(self, limit: int = 100, state: str | None = None) -> list[Session]:
        params: dict[str, Any] = {"limit": limit} | ({"state": state} if state else {})
        body = await self._call("GET", "/api/sessions", params=params)
        return [Session.model_validate(item) for item in body["sessions"]]

    async def stop(self, session_id: str) -> Session:
        """``DELETE``: stops the run and kills its desktop (a finished session is returned as it is)."""
        return Session.model_validate(await self._call("DELETE", f"/api/sessions/{session_id}"))

    async def events(self, session_id: str) -> AsyncIterator[dict[str, Any]]:
        """The session's Server-Sent Events (everything so far, then live) until the final state."""
        timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=CONNECT_TIMEOUT_S, read=None)  # keep-alives every 15 s
        try:
            async with self._http.stream("GET", f"/api/sessions/{session_id}/events", timeout=timeout) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise _error_of(response)
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        yield json.loads(line[6:])
        except httpx.HTTPError as exc:
            raise SurfClientError(
                "surf_unavailable", f"lost e2b-surf's event stream ({type(exc).__name__})", 503
            ) from None

    async def wait(self, session_id: str, timeout: float) -> Session:
        """The finished session (steps and pages) once it ended; after ``timeout`` seconds the run is
        stopped and ``SurfClientError("timeout", …, 504)`` raised."""
        try:
            async with asyncio.timeout(timeout):
                async for event in self.events(session_id):
                    if event.get("type") == "state" and event.get("state") in FINAL_STATES:
                        break
        except TimeoutError:
            with contextlib.suppress(SurfClientError):
                await self.stop(session_id)
            raise SurfClientError(
                "timeout", f"surf session {session_id} did not finish within {timeout:g} s; it was stopped", 504
            ) from None
        return await self.get(session_id)

    async def run(self, request: dict[str, Any], timeout: float) -> Session:
        """Start a session and wait for its end (see ``wait``)."""
        session = await self.start(request)
        return await self.wait(session.session_id, timeout)
