"""Drive e2b-mcp-server with the mcp==1.22.0 client (Agent Zero's pin), the way Agent Zero does.

Runs inside the separate 1.22 venv, so it imports nothing from pmoves_e2b.
Usage: mcp122_probe.py {http|sse|stdio} TARGET ACTION [HEADER=VALUE ...]
  TARGET: URL (http/sse) or a JSON list command line (stdio, environment inherited)
  ACTION: list | idle (list, stay silent 12 s, list again) | flow | slow
Prints one JSON line with what it saw.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import timedelta

from mcp import ClientSession, StdioServerParameters
from mcp.client.sse import sse_client
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamablehttp_client

# Agent Zero's remote limits: 5 s to connect, 10 s of stream silence, 120 s per tool call.
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 10
TOOL_TIMEOUT = timedelta(seconds=120)

CSV = "city,temp\nOslo,4\nRome,18\nCairo,30\n"
PANDAS = "import pandas as pd\ndf = pd.read_csv('/home/user/data.csv')\nprint(df['temp'].mean())"
CHART = "import matplotlib.pyplot as plt\nax = df.plot.bar(x='city', y='temp')\nplt.show()"


def transport(kind: str, target: str, headers: dict[str, str]):
    if kind == "http":
        return streamablehttp_client(
            target, headers=headers, timeout=CONNECT_TIMEOUT_S, sse_read_timeout=READ_TIMEOUT_S
        )
    if kind == "sse":
        return sse_client(target, headers=headers, timeout=CONNECT_TIMEOUT_S, sse_read_timeout=READ_TIMEOUT_S)
    command = json.loads(target)
    return stdio_client(StdioServerParameters(command=command[0], args=command[1:], env=dict(os.environ)))


def text_of(result) -> str:
    return "\n".join(c.text for c in result.content if c.type == "text")


async def call(session: ClientSession, name: str, args: dict) -> tuple[object, str]:
    result = await session.call_tool(name, args, read_timeout_seconds=TOOL_TIMEOUT)
    return result, text_of(result)


async def flow(session: ClientSession) -> dict:
    out: dict = {}
    created, _ = await call(session, "sandbox_create", {"timeout_seconds": 300})
    sandbox_id = created.structuredContent["sandbox_id"]
    out["sandbox_id"] = sandbox_id
    await call(session, "write_file", {"sandbox_id": sandbox_id, "path": "/home/user/data.csv", "content": CSV})
    _, out["pandas_text"] = await call(session, "run_code", {"sandbox_id": sandbox_id, "code": PANDAS})
    chart, _ = await call(session, "run_code", {"sandbox_id": sandbox_id, "code": CHART})
    out["chart_images"] = [c.mimeType for c in chart.content if c.type == "image"]
    out["chart_png_bytes"] = max((len(c.data) for c in chart.content if c.type == "image"), default=0)
    command, _ = await call(session, "run_command", {"sandbox_id": sandbox_id, "command": "wc -l data.csv"})
    out["command"] = command.structuredContent
    killed, _ = await call(session, "sandbox_kill", {"sandbox_id": sandbox_id})
    out["killed"] = killed.structuredContent
    after, out["after_kill_text"] = await call(session, "run_code", {"sandbox_id": sandbox_id, "code": "1"})
    out["after_kill_is_error"] = after.isError
    return out


async def slow(session: ClientSession) -> dict:
    created, _ = await call(session, "sandbox_create", {"timeout_seconds": 300})
    sandbox_id = created.structuredContent["sandbox_id"]
    try:
        result, text = await call(
            session, "run_code", {"sandbox_id": sandbox_id, "code": "import time\ntime.sleep(60)\nprint('done')"}
        )
        return {"is_error": result.isError, "text": text}
    finally:
        await call(session, "sandbox_kill", {"sandbox_id": sandbox_id})


async def main() -> None:
    kind, target, action, *header_args = sys.argv[1:]
    headers = dict(arg.split("=", 1) for arg in header_args)
    async with transport(kind, target, headers) as streams:
        read, write = streams[0], streams[1]
        async with ClientSession(read, write) as session:
            init = await session.initialize()
            answer: dict = {"protocol": init.protocolVersion, "server": init.serverInfo.name}
            if action == "list":
                answer["tools"] = [tool.name for tool in (await session.list_tools()).tools]
            elif action == "idle":
                await session.list_tools()
                await asyncio.sleep(READ_TIMEOUT_S + 2)
                answer["tools"] = [tool.name for tool in (await session.list_tools()).tools]
            elif action == "flow":
                answer.update(await flow(session))
            elif action == "slow":
                answer.update(await slow(session))
    print(json.dumps(answer))


if __name__ == "__main__":
    asyncio.run(main())
