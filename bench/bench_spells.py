"""Spells: what the spell machinery adds to running a small Python program in a sandbox.

Run as root: ``.venv/bin/python bench/bench_spells.py [--runs 20]``. Starts its own stack (temp
data dir, free ports). Baseline from the same run: the stock async SDK writing a script and
running it with ``commands.run`` on the same sandbox (what a spell does underneath). Then the
``run-python`` spell in that sandbox through the executor in-process, ``POST /spell/execute``
and NATS ``e2b.spell.execute.v1`` request-reply; and a spell in a fresh sandbox (create + run +
kill). Prints p50/p95 and the ratio to the baseline.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import anyio
import httpx
import nats
from e2b import AsyncSandbox

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from measure import report, report_baseline, timed_interleaved  # noqa: E402
from stack.harness import make_stack, stop_and_clean  # noqa: E402

from pmoves_e2b.sdk.config import build_sdk_config  # noqa: E402
from pmoves_e2b.spells.executor import SpellExecutor, SpellRequest  # noqa: E402
from pmoves_e2b.spells.registry import SpellRegistry  # noqa: E402

CODE = "print(sum(range(10)))"


async def measure(stack, runs: int) -> None:  # type: ignore[no-untyped-def]
    options = {"api_key": stack.api_key, "api_url": stack.sandbox_url, "sandbox_url": stack.sandbox_url}
    executor = SpellExecutor(SpellRegistry(None), build_sdk_config(stack.sandbox_url, stack.api_key))
    sandbox = await AsyncSandbox.create(template="code-interpreter-v1", timeout=900, **options)
    body = {"spell_name": "run-python", "parameters": {"code": CODE}, "sandbox_id": sandbox.sandbox_id}
    try:

        async def baseline() -> None:
            await sandbox.files.write("/tmp/bench/main.py", CODE)
            result = await sandbox.commands.run("cd /tmp/bench && exec /opt/venv/bin/python main.py")
            assert result.stdout == "45\n"

        async def in_process() -> None:
            run = await executor.execute(SpellRequest("run-python", {"code": CODE}, None, sandbox.sandbox_id))
            assert run["status"] == "completed"

        async with httpx.AsyncClient(headers={"X-E2B-API-Key": stack.api_key}, timeout=120) as rest:
            client = await nats.connect(stack.nats_url)

            async def via_rest() -> None:
                answer = await rest.post(stack.mcp_url + "/spell/execute", json=body)
                assert answer.json()["status"] == "completed"

            async def via_nats() -> None:
                reply = await client.request("e2b.spell.execute.v1", json.dumps(body).encode(), timeout=120)
                assert json.loads(reply.data)["topic"] == "e2b.spell.completed.v1"

            async def fresh() -> None:
                run = await executor.execute(SpellRequest("run-python", {"code": CODE}))
                assert run["status"] == "completed"

            try:
                samples = await timed_interleaved(
                    {"baseline": baseline, "executor": in_process, "rest": via_rest, "nats": via_nats, "fresh": fresh},
                    runs,
                )
            finally:
                await client.close()
    finally:
        await sandbox.kill()
    base = samples["baseline"]
    report_baseline("SDK files.write + commands.run", base)
    report("spell run-python, executor in-process", samples["executor"], base)
    report("spell run-python, POST /spell/execute", samples["rest"], base)
    report("spell run-python, NATS request-reply", samples["nats"], base)
    report("spell run-python, fresh sandbox (create+kill)", samples["fresh"], base)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
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
