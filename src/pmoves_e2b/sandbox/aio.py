"""Small asyncio helpers the control plane's background loops share."""

from __future__ import annotations

import asyncio
import contextlib


async def wait_event(event: asyncio.Event, timeout_s: float) -> None:
    """Wait until ``event`` is set or ``timeout_s`` passed. Not ``asyncio.wait_for``: on 3.11 it
    drops a cancel that arrives as the event is set, and the loop's owner then waits forever."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()
