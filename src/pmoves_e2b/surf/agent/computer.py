"""What the agent loop drives: a screen it can photograph and act on.

``DesktopComputer`` is the session's desktop sandbox through e2b-desktop's ``DesktopOps`` (the
same code path as ``POST /desktops/{id}/actions``). ``navigate`` uses the session's Playwright
page when there is one, else the browser's address bar (ctrl+L, the URL, Enter).
"""

from __future__ import annotations

import asyncio
import io
from typing import Any, Protocol

from PIL import Image
from playwright.async_api import Error as PlaywrightError

from pmoves_e2b.desktop.actions import Drag, Key, Type
from pmoves_e2b.desktop.desktops import DesktopError, DesktopOps
from pmoves_e2b.surf.agent.providers.base import AgentAction, Display, Navigate

NAVIGATE_TIMEOUT_MS = 30_000


class Computer(Protocol):
    display: Display

    async def screenshot(self) -> bytes: ...

    async def act(self, action: AgentAction) -> None: ...


async def navigate(page: Any, url: str) -> None:
    """``page.goto`` whose failure (DNS, refused, timeout) is a DesktopError the loop records."""
    try:
        await page.goto(url, timeout=NAVIGATE_TIMEOUT_MS)
    except PlaywrightError as exc:
        reason = str(exc).splitlines()[0][:200]
        raise DesktopError("navigate_failed", f"could not open {url}: {reason}", 409) from None


class DesktopComputer:
    def __init__(self, ops: DesktopOps, desktop_id: str, display: Display, page: Any = None) -> None:
        self.ops, self.desktop_id, self.display, self.page = ops, desktop_id, display, page

    async def screenshot(self) -> bytes:
        return await self.ops.screenshot(self.desktop_id)

    async def act(self, action: AgentAction) -> None:
        if isinstance(action, Navigate):
            if self.page is not None:
                await navigate(self.page, action.url)
                return
            typed = [Key(type="key", keys="ctrl+l"), Type(type="type", text=action.url), Key(type="key", keys="enter")]
            await self.ops.act(self.desktop_id, typed)
            return
        await self.ops.act(self.desktop_id, [action])


# Computer-use models work best on small screens: Anthropic scales images whose long side is
# over 1568 px (its coordinates would then miss), OpenAI's preview model was trained near
# 1024x768. A larger desktop is shown to the model scaled down to fit this, and the model's
# coordinates are scaled back up.
MODEL_SCREEN_LIMIT = Display(1280, 800)


def fit(display: Display, limit: Display = MODEL_SCREEN_LIMIT) -> Display:
    scale = min(1.0, limit.width / display.width, limit.height / display.height)
    return Display(max(1, round(display.width * scale)), max(1, round(display.height * scale)))


class ScaledComputer:
    """``inner`` as the model sees it: screenshots resized to ``display``, coordinates mapped back."""

    def __init__(self, inner: Computer, display: Display) -> None:
        self.inner, self.display = inner, display
        self._sx = inner.display.width / display.width
        self._sy = inner.display.height / display.height

    async def screenshot(self) -> bytes:
        return await asyncio.to_thread(_resize, await self.inner.screenshot(), self.display)

    async def act(self, action: AgentAction) -> None:
        await self.inner.act(self._map(action))

    def _map(self, action: AgentAction) -> AgentAction:
        if isinstance(action, Drag):
            return action.model_copy(update={"from_": self._point(*action.from_), "to": self._point(*action.to)})
        x, y = getattr(action, "x", None), getattr(action, "y", None)
        if x is None or y is None:
            return action
        sx, sy = self._point(x, y)
        return action.model_copy(update={"x": sx, "y": sy})

    def _point(self, x: int, y: int) -> tuple[int, int]:
        return (
            min(self.inner.display.width - 1, round(x * self._sx)),
            min(self.inner.display.height - 1, round(y * self._sy)),
        )


def for_model(computer: Computer) -> Computer:
    """The computer as the model should see it (scaled down when the screen is large)."""
    display = fit(computer.display)
    return computer if display == computer.display else ScaledComputer(computer, display)


def _resize(png: bytes, display: Display) -> bytes:
    image = Image.open(io.BytesIO(png)).convert("RGB").resize((display.width, display.height), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, "PNG", compress_level=1)  # fast: the model's service compresses anyway
    return out.getvalue()
