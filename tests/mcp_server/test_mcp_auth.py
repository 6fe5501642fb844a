"""Everything but /healthz needs `Bearer E2B_MCP_SERVER_TOKEN` or `X-E2B-API-Key: E2B_API_KEY`."""

from __future__ import annotations

import httpx
import pytest
from mcp_server.mcp_harness import McpService

PROTECTED = [
    ("GET", "/metrics"),
    ("POST", "/mcp"),
    ("GET", "/sse"),
    ("POST", "/messages/?session_id=0123456789abcdef0123456789abcdef"),
    ("POST", "/mcp/tools/list"),
    ("POST", "/mcp/tools/call"),
    ("POST", "/sandbox/create"),
    ("POST", "/sandbox/execute"),
    ("DELETE", "/sandbox/some-id"),
    ("GET", "/docs"),
    ("GET", "/no-such-route"),
]


def bad_credentials(service: McpService) -> list[dict[str, str]]:
    return [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {service.token}x"},
        {"Authorization": f"Basic {service.token}"},
        {"Authorization": f"Bearer {service.api_key}"},  # the API key is not the MCP token
        {"X-E2B-API-Key": "wrong"},
        {"X-E2B-API-Key": service.token},  # nor the other way round
        {"X-E2B-API-Key": ""},
    ]


@pytest.mark.parametrize("method,path", PROTECTED)
def test_missing_or_wrong_credentials_get_401_json(mcp_service: McpService, method: str, path: str) -> None:
    for headers in bad_credentials(mcp_service):
        body = b'{"tool": "sandbox_list", "arguments": {}}' if method == "POST" else None
        response = httpx.request(
            method,
            mcp_service.url + path,
            headers={**headers, "Content-Type": "application/json"},
            content=body,
            timeout=10,
            trust_env=False,
        )
        assert response.status_code == 401, (headers, response.text)
        assert response.json()["error"] == "unauthorized"
        assert response.headers["www-authenticate"].startswith("Bearer")


def executions(service: McpService) -> str:
    text = httpx.get(service.url + "/metrics", headers=service.auth, timeout=10, trust_env=False).text
    return "\n".join(line for line in text.splitlines() if line.startswith("e2b_execution"))


def test_rejected_requests_run_nothing(mcp_service: McpService) -> None:
    """A 401 executes nothing: the execution metrics do not move."""
    before = executions(mcp_service)
    for headers in ({}, {"X-E2B-API-Key": "nope"}, {"Authorization": "Bearer nope"}):
        response = httpx.post(
            mcp_service.url + "/sandbox/execute",
            json={"sandbox_id": "x", "code": "print(1)"},
            headers=headers,
            timeout=10,
            trust_env=False,
        )
        assert response.status_code == 401
    assert executions(mcp_service) == before


@pytest.mark.parametrize("use", ["bearer", "api_key"])
def test_either_credential_is_accepted(mcp_service: McpService, use: str) -> None:
    headers = mcp_service.auth if use == "bearer" else {"X-E2B-API-Key": mcp_service.api_key}
    response = httpx.post(mcp_service.url + "/mcp/tools/list", headers=headers, timeout=10, trust_env=False)
    assert response.status_code == 200
    metrics = httpx.get(mcp_service.url + "/metrics", headers=headers, timeout=10, trust_env=False)
    assert metrics.status_code == 200
    for name in ("e2b_executions_total", "e2b_executions_failed_total", "e2b_execution_duration_seconds"):
        assert f"# TYPE {name}" in metrics.text


def test_health_needs_no_auth_and_reports_dependencies(mcp_service: McpService) -> None:
    response = httpx.get(mcp_service.url + "/healthz", timeout=5, trust_env=False)
    body = response.json()
    assert body["service"] == "e2b-mcp-server"
    # The backend is down in this fixture: a hard dependency, so 503; Agent Zero is soft.
    assert response.status_code == 503 and body["status"] == "unhealthy"
    assert body["dependencies"]["sandbox_backend"] == "unavailable"
    assert body["dependencies"]["agent_zero"] == "unreachable"
    assert "nats" in body["dependencies"]
