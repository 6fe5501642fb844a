"""Bad REST input gets a JSON 4xx naming the problem; a down backend a JSON 503; never a 500."""

from __future__ import annotations

import httpx
import pytest
from mcp_server.mcp_harness import TOOLS, McpService


def post(service: McpService, path: str, content: bytes | str) -> httpx.Response:
    return httpx.post(
        service.url + path,
        content=content,
        timeout=60,
        trust_env=False,
        headers={**service.auth, "Content-Type": "application/json"},
    )


@pytest.mark.parametrize(
    "path,body,field",
    [
        ("/sandbox/create", b"{not json", None),
        ("/sandbox/create", b"[1, 2]", None),
        ("/sandbox/create", b'{"duration": "an hour"}', "duration"),
        ("/sandbox/create", b'{"duration": 0}', "duration"),
        ("/sandbox/create", b'{"memory_mb": -5}', "memory_mb"),
        ("/sandbox/create", b'{"cpu_limit": "lots"}', "cpu_limit"),
        ("/sandbox/execute", b'{"sandbox_id": "sb-1"}', "code"),
        ("/sandbox/execute", b'{"code": "print(1)"}', "sandbox_id"),
        ("/sandbox/execute", b'{"sandbox_id": 7, "code": "print(1)"}', "sandbox_id"),
        ("/sandbox/execute", b'{"sandbox_id": "sb-1", "code": ["x"]}', "code"),
        ("/sandbox/execute", "\xff\xfe".encode("latin-1"), None),
        ("/mcp/tools/call", b'{"arguments": {}}', "tool"),
        ("/mcp/tools/call", b'{"tool": "sandbox_list", "arguments": "x"}', "arguments"),
    ],
)
def test_malformed_bodies_get_422_json(mcp_service: McpService, path: str, body: bytes, field: str | None) -> None:
    response = post(mcp_service, path, body)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    if field:
        assert any(field in map(str, err["loc"]) for err in detail), detail


def test_limits_above_the_server_configuration_are_refused(mcp_service: McpService) -> None:
    response = post(mcp_service, "/sandbox/create", b'{"duration": 60, "memory_mb": 999999, "cpu_limit": 2}')
    assert response.status_code == 422
    assert "E2B_SANDBOX_MEMORY_MB" in response.json()["detail"]
    response = post(mcp_service, "/sandbox/create", b'{"duration": 60, "memory_mb": 512, "cpu_limit": 64}')
    assert response.status_code == 422
    assert "E2B_SANDBOX_CPU_LIMIT" in response.json()["detail"]


def test_tool_call_errors(mcp_service: McpService) -> None:
    unknown = post(mcp_service, "/mcp/tools/call", b'{"tool": "e2b.sandbox.create", "arguments": {}}')
    assert unknown.status_code == 404
    assert "sandbox_create" in unknown.json()["detail"]  # lists the real names
    wrong_type = post(mcp_service, "/mcp/tools/call", b'{"tool": "sandbox_kill", "arguments": {"sandbox_id": 5}}')
    assert wrong_type.status_code == 422 and "sandbox_id" in wrong_type.json()["detail"]
    missing = post(mcp_service, "/mcp/tools/call", b'{"tool": "read_file", "arguments": {"sandbox_id": "x"}}')
    assert missing.status_code == 422 and "path" in missing.json()["detail"]


def test_backend_down_is_a_clear_503(mcp_service: McpService) -> None:
    calls = [
        ("POST", "/sandbox/create", b'{"duration": 60, "memory_mb": 512, "cpu_limit": 1}'),
        ("POST", "/sandbox/execute", b'{"sandbox_id": "sb-1", "language": "python", "code": "print(1)"}'),
        ("DELETE", "/sandbox/sb-1", None),
        ("POST", "/mcp/tools/call", b'{"tool": "sandbox_list"}'),
    ]
    for method, path, body in calls:
        response = httpx.request(
            method,
            mcp_service.url + path,
            content=body,
            timeout=60,
            trust_env=False,
            headers={**mcp_service.auth, "Content-Type": "application/json"},
        )
        assert response.status_code == 503, (path, response.text)
        assert "e2b-sandbox" in response.json()["detail"]


def test_tools_list_over_rest(mcp_service: McpService) -> None:
    response = post(mcp_service, "/mcp/tools/list", b"")
    tools = {tool["name"]: tool for tool in response.json()["tools"]}
    assert set(tools) >= TOOLS
    assert not any("." in name for name in tools)  # Agent Zero splits "<server>.<tool>" on dots
    assert tools["run_code"]["inputSchema"]["required"] == ["code"]
