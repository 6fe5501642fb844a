"""The keepalive helper: progress notifications with a progress token, log lines without one."""

from __future__ import annotations

import anyio
import pytest
from mcp import Client
from mcp.server.mcpserver import Context, MCPServer

from pmoves_e2b.mcp.keepalive import keepalive

# pytest re-enables warnings per test; the service filters this one at import (keepalive.py).
pytestmark = pytest.mark.filterwarnings("ignore:The logging capability is deprecated")


def slow_server() -> MCPServer:
    server = MCPServer("keepalive-test")

    @server.tool()
    async def wait(seconds: float, ctx: Context) -> str:
        async with keepalive(ctx, "wait", interval=0.1) as progress:
            progress.note_output("first line\nlatest line\n")
            await anyio.sleep(seconds)
        return "ok"

    return server


def test_progress_notifications_when_the_caller_asks() -> None:
    messages: list[str] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        messages.append(message or "")

    async def main() -> str:
        async with Client(slow_server(), mode="legacy") as client:
            result = await client.call_tool("wait", {"seconds": 0.65}, progress_callback=on_progress)
            return result.content[0].text

    assert anyio.run(main) == "ok"
    assert len(messages) >= 3
    assert messages[-1].startswith("wait: running for") and messages[-1].endswith("last output: latest line")


def test_log_lines_when_no_progress_token() -> None:
    lines: list[str] = []

    async def on_log(params: object) -> None:
        lines.append(str(getattr(params, "data", "")))

    async def main() -> None:
        async with Client(slow_server(), mode="legacy", logging_callback=on_log) as client:
            await client.call_tool("wait", {"seconds": 0.65})

    anyio.run(main)
    assert len(lines) >= 3 and all(line.startswith("wait: running for") for line in lines)
