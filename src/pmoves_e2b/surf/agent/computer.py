"""What the agent loop drives: a screen it can photograph and act on.

``DesktopComputer`` is the session's desktop sandbox through e2b-desktop's ``DesktopOps`` (the
same code path as ``POST /desktops/{id}/actions``). ``navigate`` uses the session's Playwright
page when there is one, else the browser's address bar (ctrl+L, the URL, Enter).
"""

from __future__ import annotations

from typing import Any, Protocol

from pmoves_e2b.desktop.actions import Key, Type
from pmoves_e2b.desktop.desktops import DesktopOps
from pmoves_e2b.surf.agent.providers.base import AgentAction, Display, Navigate


class Computer(Protocol):
    display: Display

    async def screenshot(self) -> bytes: ...

    async def act(self, action: AgentAction) -> None: ...


class DesktopComputer:
    def __init__(self, ops: DesktopOps, desktop_id: str, display: Display, page: Any = None) -> None:
        self.ops, self.desktop_id, self.display, self.page = ops, desktop_id, display, page

    async def screenshot(self) -> bytes:
        return await self.ops.screenshot(self.desktop_id)

    async def act(self, action: AgentAction) -> None:
        if isinstance(action, Navigate):
            if self.page is not None:
                await self.page.goto(action.url)
                return
            typed = [Key(type="key", keys="ctrl+l"), Type(type="type", text=action.url), Key(type="key", keys="enter")]
            await self.ops.act(self.desktop_id, typed)
            return
        await self.ops.act(self.desktop_id, [action])
