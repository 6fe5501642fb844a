"""e2b-mcp-server against the running stack: agent flows over every transport with both client
versions, PMOVES' REST payloads, unknown/expired sandbox errors, and the 60-s keepalive."""

from __future__ import annotations

import base64
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp_server.mcp_harness import McpService, run_probe

pytestmark = pytest.mark.stack

CSV = "city,temp\nOslo,4\nRome,18\nCairo,30\n"
PANDAS = "import pandas as pd\ndf = pd.read_csv('/home/user/data.csv')\nprint(df['temp'].mean())"
CHART = "import matplotlib.pyplot as plt\nax = df.plot.bar(x='city', y='temp')\nplt.show()"
NOT_FOUND = "was not found or has expired; create one with sandbox_create"


@pytest.fixture(scope="module")
def stack_mcp(running_stack: Any) -> McpService:
    return McpService(running_stack.mcp_url, running_stack.mcp_token, running_stack.api_key, running_stack.env)


def transport(service: McpService, kind: str, http: httpx2.AsyncClient) -> object:
    if kind == "http":
        return streamable_http_client(service.url + "/mcp", http_client=http)
    if kind == "sse":
        return sse_client(service.url + "/sse", headers=service.auth)
    command = service.stdio_command()
    return StdioServerParameters(command=command[0], args=command[1:], env=service.env)


def run_with_client(service: McpService, kind: str, scenario: Any) -> Any:
    async def main() -> Any:
        async with httpx2.AsyncClient(headers=service.auth, timeout=httpx2.Timeout(30, read=120)) as http:
            async with Client(transport(service, kind, http)) as client:
                return await scenario(client)

    return anyio.run(main)


def text_of(result: Any) -> str:
    return "\n".join(item.text for item in result.content if item.type == "text")


async def call(client: Client, tool: str, **arguments: Any) -> Any:
    return await client.call_tool(tool, arguments)


@pytest.mark.parametrize("kind", ["http", "sse", "stdio"])
def test_agent_flow_current_client(stack_mcp: McpService, kind: str) -> None:
    async def scenario(client: Client) -> None:
        created = await call(client, "sandbox_create", timeout_seconds=300)
        assert not created.is_error, text_of(created)
        sandbox_id = created.structured_content["sandbox_id"]
        try:
            listed = await call(client, "sandbox_list")
            assert sandbox_id in [s["sandbox_id"] for s in listed.structured_content["sandboxes"]]
            wrote = await call(client, "write_file", sandbox_id=sandbox_id, path="/home/user/data.csv", content=CSV)
            assert wrote.structured_content["size"] == len(CSV)
            mean = await call(client, "run_code", sandbox_id=sandbox_id, code=PANDAS)
            assert not mean.is_error and "17.33" in text_of(mean)
            chart = await call(client, "run_code", sandbox_id=sandbox_id, code=CHART)  # `df` is still defined
            images = [item for item in chart.content if item.type == "image"]
            assert images and images[0].mime_type == "image/png"
            assert base64.b64decode(images[0].data).startswith(b"\x89PNG")
            command = await call(client, "run_command", sandbox_id=sandbox_id, command="wc -l data.csv")
            assert command.structured_content["exit_code"] == 0
            assert command.structured_content["stdout"].strip() == "4 data.csv"
            files = await call(client, "list_files", sandbox_id=sandbox_id)
            assert "data.csv" in [e["name"] for e in files.structured_content["entries"]]
            read = await call(client, "read_file", sandbox_id=sandbox_id, path="data.csv")
            assert read.structured_content["content"] == CSV
        finally:
            killed = await call(client, "sandbox_kill", sandbox_id=sandbox_id)
        assert killed.structured_content == {"sandbox_id": sandbox_id, "killed": True}
        after = await call(client, "run_code", sandbox_id=sandbox_id, code="1")
        assert after.is_error and f"sandbox {sandbox_id} {NOT_FOUND}" in text_of(after)

    run_with_client(stack_mcp, kind, scenario)


@pytest.mark.parametrize("kind", ["http", "sse", "stdio"])
def test_agent_flow_agent_zero_client(stack_mcp: McpService, mcp122: Path, kind: str) -> None:
    if kind == "stdio":
        target, env = json.dumps(stack_mcp.stdio_command()), stack_mcp.env
    else:
        target, env = stack_mcp.url + ("/mcp" if kind == "http" else "/sse"), None
    out = run_probe(mcp122, kind, target, "flow", f"Authorization=Bearer {stack_mcp.token}", env=env, timeout=240)
    assert "17.33" in out["pandas_text"]
    assert out["chart_images"] == ["image/png"] and out["chart_png_bytes"] > 1000
    assert out["command"]["exit_code"] == 0 and out["command"]["stdout"].strip() == "4 data.csv"
    assert out["killed"]["killed"] is True
    assert out["after_kill_is_error"] and NOT_FOUND in out["after_kill_text"]


def test_files_binary_background_and_urls(stack_mcp: McpService, running_stack: Any) -> None:
    payload = bytes(range(256))

    async def scenario(client: Client) -> None:
        sandbox_id = (await call(client, "sandbox_create", timeout_seconds=120)).structured_content["sandbox_id"]
        try:
            encoded = base64.b64encode(payload).decode()
            await call(
                client, "write_file", sandbox_id=sandbox_id, path="/tmp/bin.dat", content=encoded, encoding="base64"
            )
            read = await call(client, "read_file", sandbox_id=sandbox_id, path="/tmp/bin.dat")
            assert read.structured_content["encoding"] == "base64"
            assert base64.b64decode(read.structured_content["content"]) == payload

            started = await call(
                client,
                "run_command",
                sandbox_id=sandbox_id,
                background=True,
                command="sleep 1; echo finished > /tmp/bg.txt",
            )
            assert started.structured_content["pid"] > 0
            deadline = time.monotonic() + 30
            while True:
                done = await call(client, "run_command", sandbox_id=sandbox_id, command="cat /tmp/bg.txt")
                if done.structured_content["exit_code"] == 0 or time.monotonic() > deadline:
                    break
                await anyio.sleep(0.3)
            assert done.structured_content["stdout"] == "finished\n"

            missing = await call(client, "read_file", sandbox_id=sandbox_id, path="/nope/file.txt")
            assert missing.is_error and "does not exist" in text_of(missing)

            # Signed URLs work without credentials or SDK headers (host-routed, local CA).
            down = await call(client, "download_url", sandbox_id=sandbox_id, path="/tmp/bin.dat")
            fetched = await curl(down.structured_content["url"])
            assert fetched.returncode == 0 and fetched.stdout == payload, fetched.stderr
            up = await call(client, "upload_url", sandbox_id=sandbox_id, path="/tmp/up.txt")
            posted = await curl(up.structured_content["url"], "-F", "file=@-;filename=up.txt", stdin=b"uploaded")
            assert posted.returncode == 0, posted.stderr
            check = await call(client, "read_file", sandbox_id=sandbox_id, path="/tmp/up.txt")
            assert check.structured_content["content"] == "uploaded"
        finally:
            await call(client, "sandbox_kill", sandbox_id=sandbox_id)

    async def curl(url: str, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        # curl resolves *.localhost to loopback itself (RFC 6761), like browsers do.
        command = ["curl", "-sS", "--fail", "--max-time", "30", "--cacert", str(running_stack.ca_bundle), *args, url]
        return await anyio.to_thread.run_sync(
            lambda: subprocess.run(command, input=stdin, capture_output=True, timeout=60)
        )

    run_with_client(stack_mcp, "http", scenario)


def test_run_without_sandbox_id_starts_one(stack_mcp: McpService) -> None:
    async def scenario(client: Client) -> None:
        result = await call(client, "run_code", code="x = 6 * 7\nprint(x)")
        sandbox_id = result.structured_content["sandbox_id"]
        try:
            assert not result.is_error and "(new sandbox)" in text_of(result) and "42" in text_of(result)
            again = await call(client, "run_code", sandbox_id=sandbox_id, code="x + 1")  # same kernel
            assert "43" in text_of(again)
        finally:
            await call(client, "sandbox_kill", sandbox_id=sandbox_id)
        shell = await call(client, "run_command", command="cat /etc/hostname")
        try:
            assert shell.structured_content["exit_code"] == 0
        finally:
            await call(client, "sandbox_kill", sandbox_id=shell.structured_content["sandbox_id"])

    run_with_client(stack_mcp, "http", scenario)


def test_unknown_and_expired_sandboxes_are_clear_tool_errors(stack_mcp: McpService) -> None:
    async def scenario(client: Client) -> None:
        for tool, args in [
            ("run_code", {"code": "1"}),
            ("run_command", {"command": "true"}),
            ("read_file", {"path": "x"}),
            ("write_file", {"path": "x", "content": "y"}),
            ("list_files", {}),
            ("sandbox_kill", {}),
            ("sandbox_set_timeout", {"timeout_seconds": 60}),
            ("download_url", {"path": "x"}),
        ]:
            result = await call(client, tool, sandbox_id="sb-does-not-exist", **args)
            assert result.is_error, tool
            assert f"sandbox sb-does-not-exist {NOT_FOUND}" in text_of(result), (tool, text_of(result))

        sandbox_id = (await call(client, "sandbox_create", timeout_seconds=120)).structured_content["sandbox_id"]
        assert not (await call(client, "run_code", sandbox_id=sandbox_id, code="x = 1")).is_error
        await call(client, "sandbox_set_timeout", sandbox_id=sandbox_id, timeout_seconds=1)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            listed = (await call(client, "sandbox_list")).structured_content["sandboxes"]
            if sandbox_id not in [s["sandbox_id"] for s in listed]:
                break
            await anyio.sleep(0.5)
        else:
            pytest.fail(f"sandbox {sandbox_id} did not expire")
        expired = await call(client, "run_code", sandbox_id=sandbox_id, code="x")
        assert expired.is_error and f"sandbox {sandbox_id} {NOT_FOUND}" in text_of(expired)

    run_with_client(stack_mcp, "http", scenario)


def rest(service: McpService, method: str, path: str, body: dict | None = None, **headers: str) -> httpx.Response:
    return httpx.request(
        method,
        service.url + path,
        json=body,
        timeout=120,
        trust_env=False,
        headers={"Content-Type": "application/json", **headers},
    )


def test_pmoves_rest_contract(stack_mcp: McpService) -> None:
    """Exactly what PMOVES' Agent Zero wrapper sends: X-E2B-API-Key and its default fields."""
    key = {"X-E2B-API-Key": stack_mcp.api_key}
    created = rest(stack_mcp, "POST", "/sandbox/create", {"duration": 3600, "memory_mb": 2048, "cpu_limit": 2}, **key)
    assert created.status_code == 201, created.text
    sandbox = created.json()
    sandbox_id = sandbox["sandbox_id"]
    assert sandbox["status"] == "running" and sandbox["duration"] == 3600
    try:
        executed = rest(
            stack_mcp,
            "POST",
            "/sandbox/execute",
            {"sandbox_id": sandbox_id, "language": "python", "code": 'print("Hello from E2B!")'},
            **key,
        )
        assert executed.status_code == 200, executed.text
        body = executed.json()
        assert body["stdout"] == "Hello from E2B!\n" and body["stderr"] == "" and body["error"] is None
        assert isinstance(body["results"], list)

        shell = rest(
            stack_mcp,
            "POST",
            "/sandbox/execute",
            {"sandbox_id": sandbox_id, "language": "bash", "code": "echo $((6 * 7))"},
            **key,
        ).json()
        assert shell["stdout"] == "42\n", shell

        failing = rest(
            stack_mcp,
            "POST",
            "/sandbox/execute",
            {"sandbox_id": sandbox_id, "language": "python", "code": "1/0"},
            **key,
        ).json()
        assert failing["error"]["name"] == "ZeroDivisionError"

        # The doc's Bearer form works on the same routes.
        bearer = {"Authorization": f"Bearer {stack_mcp.token}"}
        via_tools = rest(
            stack_mcp,
            "POST",
            "/mcp/tools/call",
            {"tool": "run_command", "arguments": {"sandbox_id": sandbox_id, "command": "echo hi"}},
            **bearer,
        )
        assert via_tools.status_code == 200 and via_tools.json()["structuredContent"]["stdout"] == "hi\n"
    finally:
        deleted = rest(stack_mcp, "DELETE", f"/sandbox/{sandbox_id}", **key)
    assert deleted.status_code == 204 and deleted.content == b""
    again = rest(stack_mcp, "DELETE", f"/sandbox/{sandbox_id}", **key)
    assert again.status_code == 404 and NOT_FOUND in again.json()["detail"]
    gone = rest(stack_mcp, "POST", "/sandbox/execute", {"sandbox_id": sandbox_id, "code": "1"}, **key)
    assert gone.status_code == 404

    metrics = httpx.get(stack_mcp.url + "/metrics", headers=key, timeout=10, trust_env=False).text
    assert 'e2b_executions_total{kind="code"}' in metrics
    assert 'e2b_executions_failed_total{kind="code"}' in metrics


def test_wrong_token_creates_nothing(stack_mcp: McpService, running_stack: Any) -> None:
    def count() -> int:
        response = rest(stack_mcp, "POST", "/mcp/tools/call", {"tool": "sandbox_list"}, **stack_mcp.auth)
        return len(response.json()["structuredContent"]["sandboxes"])

    before = count()
    for headers in ({}, {"Authorization": "Bearer nope"}, {"X-E2B-API-Key": "nope"}):
        response = rest(
            stack_mcp, "POST", "/sandbox/create", {"duration": 60, "memory_mb": 512, "cpu_limit": 1}, **headers
        )
        assert response.status_code == 401
    assert count() == before


@pytest.mark.slow
def test_sixty_second_computation_keeps_agent_zero_stream_alive(stack_mcp: McpService, mcp122: Path) -> None:
    """Agent Zero's client gives up after 10 s without a byte; a 60-s run_code must still succeed."""
    out = run_probe(
        mcp122, "http", stack_mcp.url + "/mcp", "slow", f"Authorization=Bearer {stack_mcp.token}", timeout=240
    )
    assert out["is_error"] is False and "done" in out["text"]


@pytest.mark.slow
def test_sixty_second_computation_reports_progress(stack_mcp: McpService) -> None:
    messages: list[str] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        messages.append(message or "")

    async def scenario(client: Client) -> Any:
        sandbox_id = (await call(client, "sandbox_create", timeout_seconds=300)).structured_content["sandbox_id"]
        try:
            return await client.call_tool(
                "run_code",
                {"sandbox_id": sandbox_id, "code": "import time\ntime.sleep(60)\nprint('done')"},
                progress_callback=on_progress,
            )
        finally:
            await call(client, "sandbox_kill", sandbox_id=sandbox_id)

    result = run_with_client(stack_mcp, "sse", scenario)
    assert not result.is_error and "done" in text_of(result)
    assert len(messages) >= 10 and all(m.startswith("run_code: running") for m in messages)
