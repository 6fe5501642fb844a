"""Agent mode end to end on a real desktop sandbox: the loop photographs the desktop, asks a
model service (speaking OpenAI's or Anthropic's real computer-use wire format, with a scripted
policy that reads the screenshots) and runs its actions through DesktopOps; Chromium in the
desktop fills the form of a site in the test's own "fake internet" netns, and the site must
receive the submission. Run under ``flock /tmp/pmoves-netns.lock`` (fixed netns names).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from isolation.ns_harness import FAKE_INTERNET_SERVER_IP, listening_socket_in_netns
from stack.harness import RunningStack
from surf.agent_harness import (
    EMAIL,
    FORM_TASK,
    LINK_BLUE,
    NAME,
    AnthropicDouble,
    ChatDouble,
    FormSite,
    ModelDouble,
    OpenAIResponsesDouble,
    find,
    png_image,
    serving,
)

from pmoves_e2b.desktop.actions import Click, Open
from pmoves_e2b.desktop.desktops import DesktopOps
from pmoves_e2b.sdk.config import build_sdk_config
from pmoves_e2b.surf.agent.computer import Computer, DesktopComputer, ScaledComputer
from pmoves_e2b.surf.agent.loop import AgentResult, StepRecord, Takeover, run_agent
from pmoves_e2b.surf.agent.providers import Display
from pmoves_e2b.surf.agent.providers.anthropic import AnthropicComputerUse
from pmoves_e2b.surf.agent.providers.base import Provider
from pmoves_e2b.surf.agent.providers.openai_chat import OpenAIChat
from pmoves_e2b.surf.agent.providers.openai_responses import OpenAIResponses

pytestmark = [pytest.mark.stack, pytest.mark.slow]

DISPLAY = Display(1024, 768)
KEY = "sk-test-" + "d" * 24
T = TypeVar("T")


class Loop:
    """One event loop on a thread for the module: the desktop's SDK objects live in it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, work: Coroutine[Any, Any, T], timeout: float = 300) -> T:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@dataclass
class Desk:
    loop: Loop
    ops: DesktopOps
    desktop_id: str
    site: FormSite

    @property
    def site_url(self) -> str:
        return f"http://{FAKE_INTERNET_SERVER_IP}:{self.site.port}/"

    def show_landing(self) -> None:
        """A fresh tab on the site's landing page, and wait until it is on the screen."""

        async def show() -> None:
            await self.ops.act(self.desktop_id, [Open(type="open", url=self.site_url)])
            deadline = time.monotonic() + 60
            while not find(png_image(await self.ops.screenshot(self.desktop_id)), LINK_BLUE):
                assert time.monotonic() < deadline, "the site's landing page never showed in the desktop"
                await asyncio.sleep(0.5)

        self.loop.run(show())


@pytest.fixture(scope="module")
def desk(surf_stack: RunningStack, internet_netns: Path) -> Iterator[Desk]:
    loop = Loop()
    ops = DesktopOps(build_sdk_config(surf_stack.sandbox_url, surf_stack.api_key), source="e2b-surf")
    site = FormSite(listening_socket_in_netns(internet_netns, "0.0.0.0"))
    try:
        desktop = loop.run(ops.create(resolution="1024x768", duration_s=900, created_by="surf-agent-test"))
        try:
            yield Desk(loop, ops, desktop.desktop_id, site)
        finally:
            loop.run(ops.kill(desktop.desktop_id))
    finally:
        site.close()
        ops.close()
        loop.close()


@dataclass
class Run:
    """An agent run going on in the module's event loop."""

    desk: Desk
    future: asyncio.Future[AgentResult]
    steps: list[StepRecord]
    stop: asyncio.Event

    def result(self, timeout: float = 300) -> AgentResult:
        async def wait() -> AgentResult:
            return await self.future

        return self.desk.loop.run(wait(), timeout)


def start_run(
    desk: Desk,
    provider: Provider,
    takeover: Takeover | None = None,
    max_steps: int = 20,
    budget_s: float = 240,
    computer: Computer | None = None,
) -> Run:
    steps: list[StepRecord] = []

    async def record(step: StepRecord) -> None:
        steps.append(step)

    async def start() -> Run:
        stop = asyncio.Event()
        work = run_agent(
            computer or DesktopComputer(desk.ops, desk.desktop_id, DISPLAY),
            provider,
            max_steps=max_steps,
            deadline=time.monotonic() + budget_s,
            stop=stop,
            takeover=takeover or Takeover(),
            record=record,
        )
        return Run(desk, asyncio.ensure_future(work), steps, stop)

    return desk.loop.run(start())


def run_loop(desk: Desk, provider: Provider, **kwargs: Any) -> tuple[AgentResult, list[StepRecord]]:
    run = start_run(desk, provider, **kwargs)
    return run.result(), run.steps


def provider_for(cls: type[Provider], double: ModelDouble, key: str = KEY) -> Provider:
    base = double.url + ("" if cls is AnthropicComputerUse else "/v1")
    return cls(model="test-cua", task=FORM_TASK, display=DISPLAY, base_url=base, api_key=key, timeout_s=30)


def check_steps(steps: list[StepRecord]) -> None:
    assert steps, "no step was recorded"
    for step in steps:
        assert step.screenshot.startswith(b"\x89PNG\r\n\x1a\n") and png_image(step.screenshot).size == (
            1024,
            768,
        )
        assert step.reasoning
    overhead = [s.total_s - s.model_s - s.settle_s for s in steps if s.actions]
    print(
        f"agent step overhead excluding model time: n={len(overhead)} mean={sum(overhead) / len(overhead):.3f}s "
        f"max={max(overhead):.3f}s"
    )


@pytest.mark.parametrize(
    "cls", [OpenAIResponses, AnthropicComputerUse, OpenAIChat], ids=["openai", "anthropic", "openai-compatible"]
)
def test_agent_fills_and_sends_the_form(desk: Desk, cls: type[Provider]) -> None:
    double_cls = {OpenAIResponses: OpenAIResponsesDouble, AnthropicComputerUse: AnthropicDouble}.get(cls, ChatDouble)
    desk.show_landing()
    before = len(desk.site.submissions)
    with serving(double_cls, KEY) as double:
        result, steps = run_loop(desk, provider_for(cls, double))
    assert result.state == "completed", (result, [(s.reasoning, s.actions, s.errors) for s in steps])
    assert result.message == "The page thanks me: the form was sent."
    assert desk.site.submissions[before:] == [{"name": NAME, "email": EMAIL}]
    check_steps(steps)
    kinds = [a["type"] for s in steps for a in s.actions]
    assert kinds.count("type") == 2 and kinds.count("click") >= 4  # link (again if slow to load), name, email, send
    assert steps[-1].done and not any(s.errors for s in steps)


def test_the_model_sees_a_scaled_screen_and_its_clicks_land(desk: Desk) -> None:
    """A screen larger than models like is shown scaled down; the model's coordinates (on the
    scaled screen) are mapped back onto the desktop, so its clicks still hit the form."""
    desk.show_landing()
    before = len(desk.site.submissions)
    small = Display(800, 600)
    with serving(OpenAIResponsesDouble, KEY) as double:
        provider = OpenAIResponses(
            model="test-cua", task=FORM_TASK, display=small, base_url=double.url + "/v1", api_key=KEY, timeout_s=30
        )
        computer = ScaledComputer(DesktopComputer(desk.ops, desk.desktop_id, DISPLAY), small)
        result, steps = run_loop(desk, provider, computer=computer)
        assert double.display == (800, 600)  # declared to the model, and every screenshot had that size
    assert result.state == "completed", (result, [(s.reasoning, s.actions, s.errors) for s in steps])
    assert desk.site.submissions[before:] == [{"name": NAME, "email": EMAIL}]


def test_a_person_takes_over_and_hands_back(desk: Desk) -> None:
    """While taken over the loop asks the model nothing; the person opens the form themselves;
    after hand-back the model goes on from the screen as the person left it."""
    desk.show_landing()
    before = len(desk.site.submissions)
    takeover = Takeover()
    takeover.take("a person is driving")
    with serving(OpenAIResponsesDouble, KEY) as double:
        run = start_run(desk, provider_for(OpenAIResponses, double), takeover=takeover)
        time.sleep(2)
        assert double.requests == [] and run.steps == [], "the model was asked while a person had the desktop"

        async def person_opens_the_form() -> None:
            link = find(png_image(await desk.ops.screenshot(desk.desktop_id)), LINK_BLUE)
            assert link is not None
            await desk.ops.act(desk.desktop_id, [Click(type="click", x=link.centre[0], y=link.centre[1])])

        desk.loop.run(person_opens_the_form())
        time.sleep(1.5)  # the form page loads
        takeover.hand_back()
        result = run.result()
    assert result.state == "completed", (result, [(s.reasoning, s.actions) for s in run.steps])
    assert desk.site.submissions[before:] == [{"name": NAME, "email": EMAIL}]
    assert double.policy.seen[0] == "form"  # the model's first screen was the person's, not the landing page
    assert "landing" not in double.policy.seen


def test_a_pending_safety_check_waits_for_a_person(desk: Desk) -> None:
    """OpenAI's pending_safety_checks: the action waits until a person hands back, then runs and
    the next computer_call_output acknowledges the check."""
    desk.show_landing()
    before = len(desk.site.submissions)
    takeover = Takeover()
    with serving(OpenAIResponsesDouble, KEY) as double:
        double.check_before_send = True
        run = start_run(desk, provider_for(OpenAIResponses, double), takeover=takeover)
        deadline = time.monotonic() + 180
        while not takeover.paused:
            assert not run.future.done(), run.result()
            assert time.monotonic() < deadline, "the safety check never paused the run"
            time.sleep(0.2)
        assert "Sending a form to an unknown site." in takeover.reason
        time.sleep(1.5)
        assert desk.site.submissions[before:] == [], "the action ran before a person accepted the check"
        takeover.hand_back()
        result = run.result()
    assert result.state == "completed", result
    assert desk.site.submissions[before:] == [{"name": NAME, "email": EMAIL}]
    assert double.acknowledged == [OpenAIResponsesDouble.SAFETY_CHECK]
    assert [s.note for s in run.steps if s.note] == ["safety check: Sending a form to an unknown site."]


def test_stop_and_time_budget_end_a_run(desk: Desk) -> None:
    """On a page the policy does not know it waits turn after turn: a stop ends the run as
    stopped, the time budget as failed (timeout), both promptly."""

    async def unknown_page() -> None:
        await desk.ops.act(desk.desktop_id, [Open(type="open", url=desk.site_url + "nothing-here")])
        await asyncio.sleep(3)

    desk.loop.run(unknown_page())
    with serving(AnthropicDouble, KEY) as double:
        run = start_run(desk, provider_for(AnthropicComputerUse, double))
        time.sleep(3)
        desk.loop.loop.call_soon_threadsafe(run.stop.set)
        started = time.monotonic()
        stopped = run.result()
        assert time.monotonic() - started < 5
        assert stopped.state == "stopped" and stopped.error_code == "stopped"
        started = time.monotonic()
        timed_out, _ = run_loop(desk, provider_for(AnthropicComputerUse, double), budget_s=4)
    assert timed_out.state == "failed" and timed_out.error_code == "timeout"
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("status", [500, 401])
def test_a_model_error_fails_the_run_cleanly(desk: Desk, status: int) -> None:
    with serving(AnthropicDouble, KEY) as double:
        if status == 500:
            double.fail = (500, double.error_body("api_error", "Internal server error"))
            provider = provider_for(AnthropicComputerUse, double)
        else:
            provider = provider_for(AnthropicComputerUse, double, key="sk-revoked")
        started = time.monotonic()
        result, steps = run_loop(desk, provider)
    assert time.monotonic() - started < 30
    assert result.state == "failed" and steps == []
    if status == 500:
        assert result.error_code == "model_error"
        assert "HTTP 500" in result.message and "Internal server error" in result.message
    else:
        assert result.error_code == "model_auth"
        assert "refused the API key" in result.message and "sk-revoked" not in result.message


def test_a_desktop_that_ends_under_the_run_fails_it_cleanly(desk: Desk) -> None:
    """Its own desktop (blank: the policy waits turn after turn), killed during the run."""
    other = desk.loop.run(desk.ops.create(resolution="1024x768", duration_s=300, created_by="surf-agent-test"))
    with serving(AnthropicDouble, KEY) as double:
        provider = provider_for(AnthropicComputerUse, double)

        async def start() -> Run:
            steps: list[StepRecord] = []

            async def record(step: StepRecord) -> None:
                steps.append(step)

            work = run_agent(
                DesktopComputer(desk.ops, other.desktop_id, DISPLAY),
                provider,
                max_steps=50,
                deadline=time.monotonic() + 120,
                stop=asyncio.Event(),
                takeover=Takeover(),
                record=record,
            )
            return Run(desk, asyncio.ensure_future(work), steps, asyncio.Event())

        run = desk.loop.run(start())
        time.sleep(3)
        desk.loop.run(desk.ops.kill(other.desktop_id))
        started = time.monotonic()
        result = run.result(timeout=60)
    assert result.state == "failed" and result.error_code == "desktop_gone", result
    assert other.desktop_id in result.message and time.monotonic() - started < 20
