"""e2b-mcp-server: what the MCP bridge adds to a code execution.

Run as root: ``.venv/bin/python bench/bench_mcp.py [--runs 30]``. Starts its own stack (temp data
dir, free ports). Baseline from the same run: the stock async SDK's ``run_code("1+1")`` straight
against e2b-sandbox on the same sandbox. Then the same cell as an MCP ``tools/call run_code``
(official client, streamable HTTP, one session), as PMOVES' ``POST /sandbox/execute``, and
``tools/list`` over MCP. Prints p50/p95 and the ratio to the baseline.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import anyio
import httpx
import httpx2
from e2b_code_interpreter import AsyncSandbox
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from measure import report, report_baseline, timed_interleaved  # noqa: E402
from stack.harness import make_stack, stop_and_clean  # noqa: E402

CELL = "1+1"


async def measure(stack, runs: int) -> None:  # type: ignore[no-untyped-def]
    auth = {"Authorization": f"Bearer {stack.mcp_token}"}
    async with httpx2.AsyncClient(headers=auth, timeout=60) as http:
        async with Client(streamable_http_client(stack.mcp_url + "/mcp", http_client=http)) as client:
            created = await client.call_tool("sandbox_create", {"timeout_seconds": 600})
            sandbox_id = created.structured_content["sandbox_id"]
            try:
                sdk = await AsyncSandbox.connect(
                    sandbox_id, api_key=stack.api_key, api_url=stack.sandbox_url, sandbox_url=stack.sandbox_url
                )
                async with httpx.AsyncClient(headers={"X-E2B-API-Key": stack.api_key}, timeout=60) as rest:
                    body = {"sandbox_id": sandbox_id, "language": "python", "code": CELL}
                    samples = await timed_interleaved(
                        {
                            "baseline": lambda: sdk.run_code(CELL),
                            "mcp": lambda: client.call_tool("run_code", {"sandbox_id": sandbox_id, "code": CELL}),
                            "rest": lambda: rest.post(stack.mcp_url + "/sandbox/execute", json=body),
                            "tools": client.list_tools,
                        },
                        runs,
                    )
            finally:
                await client.call_tool("sandbox_kill", {"sandbox_id": sandbox_id})
    baseline = samples["baseline"]
    report_baseline("SDK run_code(1+1) direct", baseline)
    report("MCP tools/call run_code (streamable HTTP)", samples["mcp"], baseline)
    report("REST POST /sandbox/execute", samples["rest"], baseline)
    report("MCP tools/list (streamable HTTP)", samples["tools"], baseline)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    options = parser.parse_args()
    stack = make_stack()
    try:
        stack.up()
        anyio.run(measure, stack, options.runs)
    finally:
        stop_and_clean(stack)
    return 0


if __name__ == "__main__":
    sys.exit(main())
