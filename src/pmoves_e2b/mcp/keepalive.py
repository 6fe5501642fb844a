"""Progress notifications during long tool calls.

Agent Zero drops a remote MCP stream after 10 s without bytes; we send a notification every
few seconds while a tool runs: ``notifications/progress`` when the caller sent a progress
token, otherwise a ``notifications/message`` log line (both travel on the call's stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import warnings
from collections.abc import AsyncIterator

from mcp.server.mcpserver import Context
from mcp.shared.exceptions import MCPDeprecationWarning

KEEPALIVE_INTERVAL_S = 3.0

# Log notifications are deprecated from protocol 2026-07-28 on, but they are how a
# handshake-era client without a progress token (Agent Zero's mcp 1.22) hears from us.
warnings.filterwarnings("ignore", message="The logging capability is deprecated", category=MCPDeprecationWarning)

log = logging.getLogger(__name__)


class Progress:
    """What the keepalive reports; tools update ``latest`` with their newest output line."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.latest = ""
        self.started = time.monotonic()

    def note_output(self, text: str) -> None:
        lines = [line for line in text.splitlines() if line.strip()]
        if lines:
            self.latest = lines[-1][:200]

    def message(self) -> str:
        elapsed = time.monotonic() - self.started
        text = f"{self.what}: running for {elapsed:.0f}s"
        return f"{text}; last output: {self.latest}" if self.latest else text


def _has_request(ctx: Context | None) -> bool:
    if ctx is None:
        return False
    try:
        _ = ctx.request_context
    except ValueError:  # REST calls run tools without an MCP request
        return False
    return True


async def _notify(ctx: Context, progress: Progress) -> None:
    meta = ctx.request_context.meta or {}
    elapsed = time.monotonic() - progress.started
    if meta.get("progress_token") is not None or meta.get("progressToken") is not None:
        await ctx.report_progress(elapsed, None, progress.message())
    else:
        await ctx.log("info", progress.message(), logger_name="e2b-mcp-server")


@contextlib.asynccontextmanager
async def keepalive(ctx: Context | None, what: str, interval: float = KEEPALIVE_INTERVAL_S) -> AsyncIterator[Progress]:
    progress = Progress(what)
    if not _has_request(ctx):
        yield progress
        return
    if ctx is None:  # _has_request checked it; this narrows the type
        raise RuntimeError("progress without a request context")

    async def beat() -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await _notify(ctx, progress)
            except Exception:  # a client that went away must not fail the tool itself
                log.debug("progress notification failed", exc_info=True)

    task = asyncio.create_task(beat())
    try:
        yield progress
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
