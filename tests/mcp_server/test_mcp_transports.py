"""tools/list over every transport with the official client, current and Agent Zero's mcp==1.22.0."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import httpx
import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp_server.mcp_harness import TOOLS, McpService, run_probe


async def list_tools(transport: object) -> set[str]:
    async with Client(transport) as client:
        return {tool.name for tool in (await client.list_tools()).tools}


def current_client_tools(service: McpService, kind: str) -> set[str]:
    async def run() -> set[str]:
        if kind == "http":
            async with httpx2.AsyncClient(headers=service.auth, timeout=30) as http:
                return await list_tools(streamable_http_client(service.url + "/mcp", http_client=http))
        if kind == "sse":
            return await list_tools(sse_client(service.url + "/sse", headers=service.auth))
        command = service.stdio_command()
        return await list_tools(StdioServerParameters(command=command[0], args=command[1:], env=service.env))

    return anyio.run(run)


@pytest.mark.parametrize("kind", ["http", "sse", "stdio"])
def test_current_client_lists_tools(mcp_service: McpService, kind: str) -> None:
    assert current_client_tools(mcp_service, kind) >= TOOLS


@pytest.mark.parametrize("kind", ["http", "sse", "stdio"])
def test_agent_zero_client_lists_tools(mcp_service: McpService, mcp122: Path, kind: str) -> None:
    if kind == "stdio":
        target, env = json.dumps(mcp_service.stdio_command()), mcp_service.env
    else:
        target, env = mcp_service.url + ("/mcp" if kind == "http" else "/sse"), None
    answer = run_probe(mcp122, kind, target, "list", f"Authorization=Bearer {mcp_service.token}", env=env)
    assert set(answer["tools"]) >= TOOLS
    assert answer["server"] == "e2b-mcp-server"
    assert answer["protocol"] == "2025-06-18"


@pytest.mark.parametrize("kind", ["http", "sse"])
def test_idle_session_outlives_agent_zero_read_timeout(mcp_service: McpService, mcp122: Path, kind: str) -> None:
    """Agent Zero reads with a 10-s timeout; an idle session must still work 12 s later."""
    target = mcp_service.url + ("/mcp" if kind == "http" else "/sse")
    answer = run_probe(mcp122, kind, target, "idle", f"Authorization=Bearer {mcp_service.token}")
    assert set(answer["tools"]) >= TOOLS


def test_agent_zero_wrapper_header_works_for_mcp_too(mcp_service: McpService, mcp122: Path) -> None:
    """PMOVES' own client only knows X-E2B-API-Key; it may use it on the MCP endpoint as well."""
    answer = run_probe(mcp122, "http", mcp_service.url + "/mcp", "list", f"X-E2B-API-Key={mcp_service.api_key}")
    assert set(answer["tools"]) >= TOOLS


def test_host_and_origin_protection_stays_on(mcp_service: McpService) -> None:
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
    }
    headers = {**mcp_service.auth, "Accept": "application/json, text/event-stream"}

    def post(**extra: str) -> int:
        return httpx.post(
            mcp_service.url + "/mcp", json=init, headers={**headers, **extra}, timeout=10, trust_env=False
        ).status_code

    assert post() == 200
    assert post(Host="evil.example") == 421
    assert post(Origin="http://evil.example") == 403
    # The PMOVES compose host name is allowed by default (E2B_MCP_ALLOWED_HOSTS).
    assert post(Host="e2b-mcp-server:7073") == 200
    sse = httpx.get(
        mcp_service.url + "/sse", headers={**mcp_service.auth, "Host": "evil.example"}, timeout=10, trust_env=False
    )
    assert sse.status_code == 421


def test_allowed_hosts_are_configurable(tmp_path: Path) -> None:
    from mcp_server.mcp_harness import run_service

    with run_service(tmp_path, E2B_MCP_ALLOWED_HOSTS="mcp.internal, proxy.lan:8443") as service:
        init = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "t", "version": "1"},
            },
        }
        headers = {**service.auth, "Accept": "application/json, text/event-stream"}

        def post(host: str, origin: str | None = None) -> int:
            extra = {"Host": host, **({"Origin": origin} if origin else {})}
            return httpx.post(
                service.url + "/mcp", json=init, headers={**headers, **extra}, timeout=10, trust_env=False
            ).status_code

        assert post("mcp.internal") == 200
        assert post("mcp.internal:7073", "https://mcp.internal:7073") == 200
        assert post("proxy.lan:8443") == 200
        assert post("proxy.lan:9999") == 421
        assert post("e2b-mcp-server") == 421  # replaced, not added to
