"""Watching desktops: which exist, when one ends (killed, timeout) and when one crashes inside.

e2b-desktop runs one ``DesktopWatcher``. Every ``interval`` seconds it lists the desktops
from the sandbox backend (whoever created them: e2b-desktop, e2b-mcp-server, a previous run)
and reports new ones as created and vanished ones as killed or timeout (by their end time).
For each live desktop it also waits on the desktop's X server process through envd; when
Xvfb exits while the sandbox still runs, the desktop is reported failed and removed, so a
crashed desktop never looks alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

from e2b import AsyncSandbox
from e2b.sandbox.commands.command_handle import CommandExitException

from pmoves_e2b.desktop import metrics
from pmoves_e2b.desktop.desktops import Desktop, DesktopError, DesktopOps, utcnow
from pmoves_e2b.desktop_boot import X_START_S

log = logging.getLogger(__name__)

EndKind = Literal["created", "killed", "timeout", "failed"]
# Gets (kind, desktop, reason); publishes the events.
Emit = Callable[[EndKind, Desktop, str], Awaitable[None]]
# A desktop whose end time is this close when it vanishes ended by timeout.
TIMEOUT_SLACK = timedelta(seconds=3)
DISPLAY_POLL_S = 5.0
# From the sandbox's start: longer than a create takes to start Xvfb (desktop_boot.X_START_S is its limit).
BOOT_GRACE = timedelta(seconds=X_START_S + 5)
BOOT_POLL_S = 0.5


@dataclass
class DesktopWatcher:
    ops: DesktopOps
    emit: Emit
    interval: float = 2.0
    known: dict[str, Desktop] = field(default_factory=dict)
    _displays: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    _failed: set[str] = field(default_factory=set)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._displays.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def created(self, desktop: Desktop) -> None:
        """A desktop this service made: report it now instead of at the next listing."""
        if desktop.desktop_id not in self.known:
            self._add(desktop)
            await self.emit("created", desktop, "created")

    async def _run(self) -> None:
        first = True
        while True:
            try:
                await self.poll(report_new=not first)
                first = False
            except DesktopError as exc:
                log.debug("desktop listing failed: %s", exc.message)
            except Exception:
                log.exception("desktop watcher failed")
            await asyncio.sleep(self.interval)

    async def poll(self, report_new: bool = True) -> None:
        live = {d.desktop_id: d for d in await self.ops.live()}
        for desktop_id, desktop in live.items():
            if desktop_id not in self.known:
                self._add(desktop)
                if report_new:
                    await self.emit("created", desktop, "created")
        for desktop_id in [d for d in self.known if d not in live]:
            desktop = self.known.pop(desktop_id)
            self._stop_display_watch(desktop_id)
            self.ops.forget(desktop_id)
            if desktop_id in self._failed:
                self._failed.discard(desktop_id)
                continue
            kind: EndKind = "timeout" if desktop.end_at <= utcnow() + TIMEOUT_SLACK else "killed"
            metrics.DESKTOPS_ENDED.labels(kind).inc()
            await self.emit(kind, desktop, "its lifetime ended" if kind == "timeout" else "it was killed")
        metrics.DESKTOPS_ACTIVE.set(len(self.known))

    def _add(self, desktop: Desktop) -> None:
        self.known[desktop.desktop_id] = desktop
        metrics.DESKTOPS_ACTIVE.set(len(self.known))
        task = asyncio.get_running_loop().create_task(self._watch_display(desktop))
        self._displays[desktop.desktop_id] = task

    def _stop_display_watch(self, desktop_id: str) -> None:
        task = self._displays.pop(desktop_id, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def _watch_display(self, desktop: Desktop) -> None:
        """Wait for the desktop's Xvfb to exit; if the sandbox still runs then, it crashed.

        Waiting on the process through envd is instant; when that is not possible (Xvfb died
        before the watch began, or envd broke the stream) the display is polled instead.
        """
        options = self.ops.config.options()
        try:
            sandbox = await AsyncSandbox.connect(desktop.desktop_id, **options)
            processes = await sandbox.commands.list()
            xvfb = next((p for p in processes if any("Xvfb" in part for part in [p.cmd, *p.args])), None)
            if xvfb is not None:
                with contextlib.suppress(Exception):  # any exit, a pid already gone, or a broken stream
                    handle = await sandbox.commands.connect(xvfb.pid, timeout=0)
                    await handle.wait()
            else:  # no Xvfb yet: a desktop listed while it boots gets the time its boot has to start one
                while not await self._display_runs(sandbox) and utcnow() < desktop.started_at + BOOT_GRACE:
                    await asyncio.sleep(BOOT_POLL_S)
            while await self._display_runs(sandbox):
                await asyncio.sleep(DISPLAY_POLL_S)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the sandbox is unreachable: the listing reports its end
            log.debug("display watch of %s ended: %s", desktop.desktop_id, exc)
            return
        if desktop.desktop_id not in self.known or await self.ops.is_gone(desktop.desktop_id):
            return  # the desktop ended: the listing reports it
        self._failed.add(desktop.desktop_id)
        metrics.DESKTOPS_ENDED.labels("failed").inc()
        await self.emit("failed", desktop, "the desktop's display (Xvfb) stopped; the desktop was removed")
        with contextlib.suppress(Exception):
            await AsyncSandbox.kill(desktop.desktop_id, **options)

    @staticmethod
    async def _display_runs(sandbox: AsyncSandbox) -> bool:
        try:
            await sandbox.commands.run("pgrep -x Xvfb", timeout=10)
        except CommandExitException:
            return False  # pgrep: no such process
        return True
