"""Hostile request bodies on every service's JSON routes: deeply nested JSON is a clear 400 (not a
500 from a RecursionError), a huge body is a 413, and no error reflects the caller's input back."""

from __future__ import annotations

import httpx
import pytest
from stack.harness import RunningStack

pytestmark = pytest.mark.stack

DEEP = b"[" * 100_000
HUGE_MARKER = "reflected-input-"
HUGE = ('{"sandbox_id": "sb-1", "code": "' + HUGE_MARKER * 350_000 + '"}').encode()  # ~5.6 MB


def _routes(stack: RunningStack) -> list[tuple[str, dict[str, str]]]:
    api = {"X-API-KEY": stack.api_key}
    mcp = {"Authorization": f"Bearer {stack.mcp_token}"}
    desktop = {"Authorization": f"Bearer {stack.desktop_token}"}
    return [
        (f"{stack.sandbox_url}/sandboxes", api),
        (f"{stack.mcp_url}/sandbox/create", mcp),
        (f"{stack.mcp_url}/sandbox/execute", mcp),
        (f"{stack.mcp_url}/mcp/tools/call", mcp),
        (f"{stack.desktop_url}/desktops", desktop),
    ]


def _post(url: str, headers: dict[str, str], body: bytes) -> httpx.Response:
    return httpx.post(
        url, content=body, headers={**headers, "Content-Type": "application/json"}, timeout=60, trust_env=False
    )


def test_deeply_nested_json_is_a_clear_400(running_stack: RunningStack) -> None:
    for url, headers in _routes(running_stack):
        response = _post(url, headers, DEEP)
        assert response.status_code in (400, 422), (url, response.status_code, response.text[:300])
        assert response.headers["content-type"].startswith("application/json"), url
        assert "nest" in response.text.lower() or "json" in response.text.lower(), (url, response.text[:300])


def test_huge_bodies_are_413_and_never_reflected(running_stack: RunningStack) -> None:
    for url, headers in _routes(running_stack):
        response = _post(url, headers, HUGE)
        assert response.status_code == 413, (url, response.status_code, response.text[:300])
        assert HUGE_MARKER not in response.text, url
        assert len(response.content) < 2048, (url, len(response.content))


def test_validation_errors_do_not_echo_the_input(running_stack: RunningStack) -> None:
    mcp = {"Authorization": f"Bearer {running_stack.mcp_token}"}
    secretish = "do-not-echo-" * 1000
    body = ('{"sandbox_id": "sb-1", "code": ["' + secretish + '"]}').encode()
    response = _post(f"{running_stack.mcp_url}/sandbox/execute", mcp, body)
    assert response.status_code == 422, response.text[:300]
    assert "do-not-echo-" not in response.text
    assert "code" in response.text  # still names the field
