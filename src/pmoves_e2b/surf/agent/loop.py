"""The agent loop: screenshot -> model -> actions -> screenshot ... until the model says it is
done, ``max_steps`` turns, the deadline, or a stop.

Every turn is recorded (the screenshot after it, the model's reasoning, the actions and what
went wrong) through ``record``. A person can take over between turns (:class:`Takeover`): the
loop waits while they drive the live desktop and, when they hand back, goes on from a fresh
screenshot. A model's pending safety checks also hand the desktop to a person: the actions run
(acknowledged) only after they hand back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pmoves_e2b.desktop.desktops import DesktopError
from pmoves_e2b.surf.agent.computer import Computer
from pmoves_e2b.surf.agent.providers.base import Provider, ProviderError, Turn

log = logging.getLogger(__name__)

# After a click, a key or a navigation the page needs a moment (a form posts, a page loads)
# before the screenshot shows the result; without it the model sees the old screen and repeats.
SETTLE_S = 0.4
HANDBACK_POLL_S = 0.5
SETTLING = frozenset({"click", "double_click", "key", "navigate", "drag"})


@dataclass
class StepRecord:
    """One turn of the loop, as the session records it."""

    index: int
    screenshot: bytes  # the screen after the turn's actions
    reasoning: str
    actions: list[dict[str, Any]]
    errors: list[str] = field(default_factory=list)
    done: bool = False
    message: str = ""
    model_s: float = 0.0  # time waiting for the model
    settle_s: float = 0.0  # the deliberate pause for the page to react before the screenshot
    total_s: float = 0.0  # the whole turn; total_s - model_s - settle_s is our overhead
    note: str = ""  # e.g. "taken over", "safety check"


@dataclass
class AgentResult:
    state: Literal["completed", "failed", "stopped"]
    message: str
    steps: int
    error_code: str | None = None


Record = Callable[[StepRecord], Awaitable[None]]


class Takeover:
    """A person drives the desktop between turns; the loop waits until they hand back.

    The two events are the session's (``RunContext.taken_over`` / ``handed_back``, set by the
    take-over endpoints) or private ones in a standalone loop.
    """

    def __init__(self, taken_over: asyncio.Event | None = None, handed_back: asyncio.Event | None = None) -> None:
        self.taken_over = taken_over or asyncio.Event()
        self.handed_back = handed_back or asyncio.Event()
        self.reason = ""

    @property
    def paused(self) -> bool:
        return self.taken_over.is_set()

    def take(self, reason: str = "taken over") -> None:
        self.reason = reason
        self.taken_over.set()

    def hand_back(self) -> None:
        self.reason = ""
        self.taken_over.clear()
        self.handed_back.set()

    async def wait(self) -> None:
        while self.taken_over.is_set():
            self.handed_back.clear()
            # Polled too: a hand-back between the check and the clear must not be missed.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.handed_back.wait(), HANDBACK_POLL_S)


class _Stop(Exception):
    def __init__(self, result: AgentResult) -> None:
        self.result = result


async def run_agent(
    computer: Computer,
    provider: Provider,
    *,
    max_steps: int,
    deadline: float,
    stop: asyncio.Event,
    takeover: Takeover,
    record: Record,
    settle_s: float = SETTLE_S,
) -> AgentResult:
    """Run the loop; ``deadline`` is on ``time.monotonic()``. Never raises for model trouble:
    a provider error ends the run as ``failed`` with the provider's message."""
    runner = _Runner(computer, provider, deadline, stop, takeover, record, settle_s)
    try:
        return await runner.run(max_steps)
    except _Stop as halt:
        return halt.result
    except DesktopError as exc:  # a screenshot failed: the desktop is gone or broken
        code = "desktop_gone" if exc.status == 404 else exc.code
        return AgentResult("failed", exc.message, runner.steps, code)
    finally:
        await provider.aclose()


@dataclass
class _Runner:
    computer: Computer
    provider: Provider
    deadline: float
    stop: asyncio.Event
    takeover: Takeover
    record: Record
    settle_s: float
    steps: int = 0

    async def run(self, max_steps: int) -> AgentResult:
        shot = await self._guarded(self.computer.screenshot())
        acknowledge = False
        while self.steps < max_steps:
            if await self._pause_point():
                shot = await self._guarded(self.computer.screenshot())
            started = time.monotonic()
            try:
                turn = await self._guarded(self.provider.step(shot, acknowledge=acknowledge))
            except ProviderError as exc:
                raise _Stop(AgentResult("failed", exc.message, self.steps, exc.code)) from None
            model_s = time.monotonic() - started
            acknowledge = False
            self.steps += 1
            note = ""
            if turn.safety_checks:
                # The model's service asks a person first: hand them the desktop, run after hand-back.
                self.takeover.take("safety check: " + "; ".join(turn.safety_checks))
                note = self.takeover.reason
                await self.record(self._step(shot, turn, [], model_s, started, note=note))
                await self._pause_point()
                acknowledge, started, model_s = True, time.monotonic(), 0.0
            errors = list(turn.rejected)
            for action in turn.actions:
                try:
                    await self._guarded(self.computer.act(action))
                except DesktopError as exc:
                    if exc.status == 404:
                        raise _Stop(AgentResult("failed", exc.message, self.steps, "desktop_gone")) from None
                    errors.append(f"{action.type}: {exc.message}")
            settle_s = 0.0
            if any(a.type in SETTLING for a in turn.actions):
                settle_s = self.settle_s
                await self._guarded(asyncio.sleep(settle_s))
            if turn.actions:
                shot = await self._guarded(self.computer.screenshot())
            await self.record(self._step(shot, turn, errors, model_s, started, settle_s=settle_s))
            if turn.done:
                return AgentResult("completed", turn.message or "the model says the task is done", self.steps)
        return AgentResult(
            "failed", f"stopped after max_steps={max_steps} turns without the model finishing", self.steps, "max_steps"
        )

    def _step(
        self,
        shot: bytes,
        turn: Turn,
        errors: list[str],
        model_s: float,
        started: float,
        note: str = "",
        settle_s: float = 0.0,
    ) -> StepRecord:
        return StepRecord(
            index=self.steps,
            screenshot=shot,
            reasoning=turn.reasoning,
            actions=[a.model_dump(by_alias=True) for a in turn.actions] if not note else [],
            errors=errors,
            done=turn.done,
            message=turn.message,
            model_s=model_s,
            settle_s=settle_s,
            total_s=time.monotonic() - started,
            note=note,
        )

    async def _pause_point(self) -> bool:
        """Between turns: wait out a take-over. True if a person had the desktop."""
        if not self.takeover.paused:
            self._check()
            return False
        waiter = asyncio.ensure_future(self.takeover.wait())
        try:
            await self._guarded(waiter)
        finally:
            waiter.cancel()
        return True

    def _check(self) -> None:
        if self.stop.is_set():
            raise _Stop(AgentResult("stopped", "stopped on request", self.steps, "stopped"))
        if time.monotonic() >= self.deadline:
            raise _Stop(AgentResult("failed", "the run's time budget ran out", self.steps, "timeout"))

    async def _guarded(self, work: Awaitable[Any]) -> Any:
        """Await ``work`` unless a stop or the deadline comes first (then it is cancelled)."""
        self._check()
        task = asyncio.ensure_future(work)
        stopper = asyncio.ensure_future(self.stop.wait())
        try:
            done, _ = await asyncio.wait(
                {task, stopper}, timeout=max(0.0, self.deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stopper.cancel()
        if task not in done:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            self._check()
            raise _Stop(AgentResult("failed", "the run's time budget ran out", self.steps, "timeout"))
        return task.result()
