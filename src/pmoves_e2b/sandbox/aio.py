"""Small asyncio helpers the control plane shares: waiting on an event, polling until ready."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable


async def wait_event(event: asyncio.Event, timeout_s: float) -> None:
    """Wait until ``event`` is set or ``timeout_s`` passed. Not ``asyncio.wait_for``: on 3.11 it
    drops a cancel that arrives as the event is set, and the loop's owner then waits forever."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()


async def poll_until(
    ready: Callable[[], Awaitable[bool]],
    timeout_s: float,
    *,
    first_delay_s: float = 0.0005,
    max_delay_s: float = 0.05,
    attempt_s: float = 2.0,
) -> bool:
    """Await ``ready()`` until it returns True (then True) or ``timeout_s`` passed (then False).

    The one readiness poll (envd listening, a port answering /health): an attempt that raises
    OSError or runs past ``attempt_s`` counts as "not yet"; anything else ``ready`` raises ends
    the wait (e.g. the process it waits for has exited). Pauses start at ``first_delay_s`` and
    double up to ``max_delay_s``, so a fast start is seen within a millisecond.
    """
    deadline = time.monotonic() + timeout_s
    delay = first_delay_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        try:
            async with asyncio.timeout(min(remaining, attempt_s)):
                if await ready():
                    return True
        except (TimeoutError, OSError):
            pass
        await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, max_delay_s)
