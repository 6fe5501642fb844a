"""What a mode runner gets (``RunContext``) and what it is (``Runner``).

A runner is ``async def run(ctx: RunContext) -> dict``: it does the work of one session in the
session's own desktop (``ctx.desktop_id``, driven with ``ctx.ops``) and browser (``ctx.page``, a
Playwright page of the headed Chromium in that desktop), records what it does as it goes
(``record_step``, ``record_page``: stored and sent to SSE listeners at once) and answers the
session's result (a JSON object, also stored and sent). It calls ``ctx.check()`` between units of
work: that raises when the session was stopped or its time is up. Raising ``SurfError`` fails the
session with that code and message; any other exception fails it as ``internal``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pmoves_e2b.surf.models import PageResult, Step, SurfError, SurfRequest

if TYPE_CHECKING:
    from playwright.async_api import BrowserContext, Page

    from pmoves_e2b.desktop.desktops import DesktopOps
    from pmoves_e2b.surf.browser import SurfBrowser

Runner = Callable[["RunContext"], Awaitable[dict[str, Any]]]


class Stopped(Exception):
    """The session was stopped (DELETE) while the runner worked."""


class DeadlineExceeded(SurfError):
    def __init__(self, timeout_s: int) -> None:
        super().__init__("timeout", f"the run took longer than its timeout of {timeout_s} s", 504)


class Recorder:
    """Where a RunContext's records go (the SessionManager implements it)."""

    async def step(self, session_id: str, kind: str, data: dict[str, Any]) -> Step:
        raise NotImplementedError

    async def page(self, session_id: str, url: str, data: dict[str, Any]) -> PageResult:
        raise NotImplementedError

    async def save_file(self, session_id: str, name: str, data: bytes) -> dict[str, Any]:
        raise NotImplementedError

    async def spill(self, session_id: str, name: str, text: str) -> str | dict[str, Any]:
        raise NotImplementedError


@dataclass
class RunContext:
    session_id: str
    request: SurfRequest
    browser: SurfBrowser
    deadline: float  # time.monotonic() when the run's time is up
    timeout_s: int
    recorder: Recorder
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)
    # Set while a person drives the desktop (take-over); an agent loop waits for it to clear.
    taken_over: asyncio.Event = field(default_factory=asyncio.Event)
    handed_back: asyncio.Event = field(default_factory=asyncio.Event)

    # ----- the session's desktop and browser --------------------------------------------

    @property
    def desktop_id(self) -> str:
        return self.browser.desktop_id

    @property
    def ops(self) -> DesktopOps:
        return self.browser.ops

    @property
    def page(self) -> Page:
        return self.browser.page

    @property
    def context(self) -> BrowserContext:
        return self.browser.context

    # ----- time and stop -----------------------------------------------------------------

    def time_left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def check(self) -> None:
        """Raise ``Stopped`` or ``DeadlineExceeded`` when the run must end now."""
        if self.stop_requested.is_set():
            raise Stopped()
        if time.monotonic() >= self.deadline:
            raise DeadlineExceeded(self.timeout_s)

    async def sleep(self, seconds: float) -> None:
        """Sleep, but wake (and raise) when the session is stopped or runs out of time."""
        seconds = min(seconds, self.time_left())
        try:
            await asyncio.wait_for(self.stop_requested.wait(), seconds)
        except TimeoutError:
            pass
        self.check()

    async def wait_while_taken_over(self) -> None:
        """Block while a person has taken over the desktop (the agent must not act meanwhile)."""
        while self.taken_over.is_set():
            self.check()
            self.handed_back.clear()
            try:
                await asyncio.wait_for(self.handed_back.wait(), min(1.0, max(0.01, self.time_left())))
            except TimeoutError:
                pass
        self.check()

    # ----- records -----------------------------------------------------------------------

    async def record_step(self, kind: str, data: dict[str, Any], screenshot: bytes | None = None) -> Step:
        """Store a step (``kind``: ``action``, ``navigate``, ``note``, …); ``screenshot`` (PNG) becomes
        the file ``step-NNNN.png`` and ``data["screenshot"]`` its reference."""
        data = dict(data)
        if screenshot is not None:
            name = f"step-{time.monotonic_ns()}.png"
            data["screenshot"] = await self.recorder.save_file(self.session_id, name, screenshot)
        return await self.recorder.step(self.session_id, kind, data)

    async def record_page(self, url: str, data: dict[str, Any]) -> PageResult:
        """Store a visited page; ``data`` values that are file references stay files."""
        return await self.recorder.page(self.session_id, url, data)

    async def save_file(self, name: str, data: bytes) -> dict[str, Any]:
        """A result file of this session (name: letters, digits, ``._-``); answers its reference."""
        return await self.recorder.save_file(self.session_id, name, data)

    async def spill(self, name: str, text: str) -> str | dict[str, Any]:
        """``text`` when small enough to store inline, else a file reference holding it."""
        return await self.recorder.spill(self.session_id, name, text)
