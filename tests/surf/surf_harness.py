"""The e2b-surf tests' client of e2b-surf's API (import from here, not from conftest)."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
from stack.harness import RunningStack

SURF_CONCURRENT = 2
FINAL = ("completed", "failed", "stopped", "interrupted")


class SurfClient:
    def __init__(self, stack: RunningStack) -> None:
        self.stack = stack
        self.http = httpx.Client(
            base_url=stack.surf_url,
            headers={"Authorization": f"Bearer {stack.surf_token}"},
            timeout=60,
            trust_env=False,
        )

    def start(self, **body: Any) -> dict[str, Any]:
        response = self.http.post("/api/surf", json=body)
        assert response.status_code == 202, response.text
        return dict(response.json())

    def get(self, session_id: str) -> dict[str, Any]:
        response = self.http.get(f"/api/sessions/{session_id}")
        assert response.status_code == 200, response.text
        return dict(response.json())

    def wait(self, session_id: str, states: tuple[str, ...] = FINAL, timeout: float = 180) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            session = self.get(session_id)
            if session["state"] in states:
                return session
            assert time.monotonic() < deadline, f"session still {session['state']} after {timeout} s"
            time.sleep(0.3)

    def events(self, session_id: str, timeout: float = 180) -> list[dict[str, Any]]:
        """Every SSE event of the session until the stream ends."""
        found = []
        with self.http.stream("GET", f"/api/sessions/{session_id}/events", timeout=timeout) as response:
            assert response.status_code == 200, response.read()
            assert response.headers["content-type"].startswith("text/event-stream")
            for line in response.iter_lines():
                if line.startswith("data: "):
                    found.append(json.loads(line[6:]))
        return found

    def close(self) -> None:
        self.http.close()
