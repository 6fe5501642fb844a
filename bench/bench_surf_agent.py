"""e2b-surf agent mode: what we add to each step, model time left out.

Run as root: ``.venv/bin/python bench/bench_surf_agent.py [--runs 3] [--api-runs 3] [--floor 20]``.
Starts its own stack (template ``desktop`` built) whose agent settings point at local model
services speaking the computer-use wire formats (tests/surf/agent_harness.py), the form site of
the agent tests in a "fake internet" netns (fixed names: not beside the netns tests).
Baseline from the same run: the floor of one step on a 1024x768 desktop, DesktopOps click +
screenshot called directly. Measured, per step with actions, minus the model's answer and the
deliberate settle pause (SETTLE_S):
- the loop alone on that desktop (``--runs`` form-filling runs): actions, screenshot, encoding;
- whole e2b-surf agent sessions (``POST /api/surf``, 1280x800, ``--api-runs``): from the model's
  answer to the next request the model service receives, so also recording each step (its
  screenshot file, the store, SSE) and the CDP/desktop round trips of a real session.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import httpx  # noqa: E402
from isolation.ns_harness import (  # noqa: E402
    FAKE_INTERNET_SERVER_IP,
    fake_internet_netns,
    listening_socket_in_netns,
)
from measure import report, report_baseline  # noqa: E402
from stack.harness import make_stack, stop_and_clean  # noqa: E402
from surf.agent_harness import (  # noqa: E402
    LINK_BLUE,
    FormSite,
    ModelDoubles,
    OpenAIResponsesDouble,
    find,
    model_services,
    png_image,
)

from pmoves_e2b.desktop.actions import Click, Open  # noqa: E402
from pmoves_e2b.desktop.desktops import DesktopOps  # noqa: E402
from pmoves_e2b.sdk.config import build_sdk_config  # noqa: E402
from pmoves_e2b.surf.agent.computer import DesktopComputer  # noqa: E402
from pmoves_e2b.surf.agent.loop import SETTLE_S, SETTLING, StepRecord, Takeover, run_agent  # noqa: E402
from pmoves_e2b.surf.agent.providers import Display  # noqa: E402
from pmoves_e2b.surf.agent.providers.openai_responses import OpenAIResponses  # noqa: E402

DISPLAY = Display(1024, 768)
KEY = "sk-bench-" + "b" * 24


async def bench(stack, site: FormSite, runs: int, floor_runs: int) -> list[float]:  # type: ignore[no-untyped-def]
    ops = DesktopOps(build_sdk_config(stack.sandbox_url, stack.api_key), source="e2b-surf")
    desktop = await ops.create(resolution="1024x768", duration_s=900, created_by="bench")
    did = desktop.desktop_id
    url = f"http://{FAKE_INTERNET_SERVER_IP}:{site.port}/"
    try:
        floor: list[float] = []
        for _ in range(floor_runs):
            started = time.perf_counter()
            await ops.act(did, [Click(type="click", x=1000, y=740)])
            await ops.screenshot(did)
            floor.append((time.perf_counter() - started) * 1000)
        overhead: list[float] = []
        model: list[float] = []
        for _ in range(runs):
            await ops.act(did, [Open(type="open", url=url)])
            while not find(png_image(await ops.screenshot(did)), LINK_BLUE):
                await asyncio.sleep(0.5)
            steps: list[StepRecord] = []

            async def record(step: StepRecord, steps: list[StepRecord] = steps) -> None:
                steps.append(step)

            double = OpenAIResponsesDouble(KEY)
            try:
                provider = OpenAIResponses(
                    model="bench",
                    task="fill the form",
                    display=DISPLAY,
                    base_url=double.url + "/v1",
                    api_key=KEY,
                    timeout_s=60,
                )
                result = await run_agent(
                    DesktopComputer(ops, did, DISPLAY),
                    provider,
                    max_steps=20,
                    deadline=time.monotonic() + 300,
                    stop=asyncio.Event(),
                    takeover=Takeover(),
                    record=record,
                )
            finally:
                double.close()
            if result.state != "completed":
                raise SystemExit(f"agent run did not complete: {result}")
            overhead += [(s.total_s - s.model_s - s.settle_s) * 1000 for s in steps if s.actions]
            model += [s.model_s * 1000 for s in steps]
        report_baseline("DesktopOps click + screenshot (direct)", floor)
        report("agent step overhead (excl. model + settle)", overhead, floor)
        print(f"{'model service answer (local double, info)':46s} p50 {statistics.median(model):8.2f} ms", flush=True)
        print(f"{'settle pause after click/key (SETTLE_S)':46s}     {SETTLE_S * 1000:8.0f} ms", flush=True)
        return floor
    finally:
        await ops.kill(did)
        ops.close()


def bench_api(stack, site: FormSite, doubles: ModelDoubles, runs: int, floor: list[float]) -> None:  # type: ignore[no-untyped-def]
    api = httpx.Client(base_url=stack.surf_url, headers={"Authorization": f"Bearer {stack.surf_token}"}, timeout=60)
    url = f"http://{FAKE_INTERNET_SERVER_IP}:{site.port}/"
    overhead: list[float] = []
    try:
        for _ in range(runs):
            doubles.reset()
            session_id = api.post(
                "/api/surf", json={"mode": "agent", "url": url, "task": "fill the form", "model": "openai:bench"}
            ).json()["session_id"]
            deadline = time.monotonic() + 300
            while (session := api.get(f"/api/sessions/{session_id}").json())["state"] in ("queued", "running"):
                if time.monotonic() > deadline:
                    raise SystemExit(f"agent session {session_id} did not finish")
                time.sleep(0.5)
            if session["state"] != "completed":
                raise SystemExit(f"agent session ended {session['state']}: {session.get('error')}")
            turns = [s["data"] for s in session["steps"] if s["kind"] == "action"]
            timeline = doubles.openai.timeline
            # turn i was answered at timeline[i][1]; the next request came at timeline[i + 1][0]
            for index, turn in enumerate(turns[: len(timeline) - 1]):
                if turn["actions"]:
                    settled = any(a["type"] in SETTLING for a in turn["actions"])
                    gap = timeline[index + 1][0] - timeline[index][1]
                    overhead.append((gap - (SETTLE_S if settled else 0)) * 1000)
    finally:
        api.close()
    report("session step overhead via API (excl. model+settle)", overhead, floor)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="form-filling runs of the loop alone")
    parser.add_argument("--api-runs", type=int, default=3, help="form-filling agent sessions through e2b-surf's API")
    parser.add_argument("--floor", type=int, default=20, help="direct click + screenshot samples")
    options = parser.parse_args()
    with model_services() as doubles:
        stack = make_stack(doubles.env)
        try:
            stack.up()
            with fake_internet_netns() as netns:
                site = FormSite(listening_socket_in_netns(netns, "0.0.0.0"))
                try:
                    floor = asyncio.run(bench(stack, site, options.runs, options.floor))
                    bench_api(stack, site, doubles, options.api_runs, floor)
                    print(f"{'form submissions received by the site':46s}     {len(site.submissions):8d}", flush=True)
                finally:
                    site.close()
        finally:
            stop_and_clean(stack)
    return 0


if __name__ == "__main__":
    sys.exit(main())
