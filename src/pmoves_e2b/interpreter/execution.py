"""One POST /execute: env set-up, the user's cell, the clean-up, and what happens when the client leaves.

The execution runs as its own task, apart from the HTTP response that reads its `OutputBuffer`:
when the client disconnects (or its timeout passes and it hangs up), the response calls
`abandon()`, the kernel is interrupted, and the context is released only once the kernel is idle
again, so the next cell finds it ready.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from . import envvars
from .contexts import Context
from .kernel import CellRun, Kernel
from .outputs import END_OF_EXECUTION, OutputBuffer, droppable_size, encode, error_line, output_line

logger = logging.getLogger(__name__)

LIVENESS_CHECK_SECONDS = 1.0
INTERRUPT_GRACE_SECONDS = 5.0
# The idle status normally follows the reply within milliseconds; past this it was lost.
IDLE_AFTER_REPLY_SECONDS = 2.0
# Deno forwards console output on its own task: now and then it lands after the idle status.
LATE_OUTPUT_RUNTIMES = frozenset({"deno"})


class Execution:
    def __init__(
        self,
        context: Context,
        code: str,
        env_vars: dict[str, str],
        access_token: str | None,
        envd_url: str,
        buffer_limit_bytes: int,
    ) -> None:
        self.context = context
        self.output = OutputBuffer(buffer_limit_bytes)
        self._code = code
        self._env_vars = env_vars
        self._access_token = access_token
        self._envd_url = envd_url
        self._wake = asyncio.Event()
        self._abandoned = False
        self._error_sent = False
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    def abandon(self) -> None:
        """The client is gone: drop its output and stop the cell."""
        self._abandoned = True
        self.output.close()
        self._wake.set()

    async def _run(self) -> None:
        try:
            async with self.context.lock:
                if self._abandoned:
                    return
                kernel = await self.context.kernel()
                await self._apply_sandbox_envs(kernel)
                runtime = kernel.choice.runtime
                if self._env_vars:
                    await kernel.run_silent(envvars.set_code(runtime, self._env_vars))
                try:
                    await self._run_cell(kernel)
                finally:
                    if self._env_vars:
                        names = list(self._env_vars)
                        await kernel.run_silent(envvars.reset_code(runtime, names, self.context.sandbox_envs or {}))
        except Exception as error:  # the client must always get an end, never a cut stream
            logger.exception("execution failed in context %s", self.context.id)
            self.output.put(encode(error_line(type(error).__name__, str(error), "")))
        finally:
            self.output.put(END_OF_EXECUTION)
            self.output.finish()

    async def _apply_sandbox_envs(self, kernel: Kernel) -> None:
        if self.context.sandbox_envs is not None:
            return
        try:
            envs = await envvars.fetch_sandbox_envs(self._envd_url, self._access_token)
        except envvars.EnvdUnavailableError as error:
            logger.warning("sandbox env vars not applied yet: %s", error)
            return
        if envs:
            await kernel.run_silent(envvars.set_code(kernel.choice.runtime, envs))
        self.context.sandbox_envs = envs or {}

    async def _run_cell(self, kernel: Kernel) -> None:
        self._wake.clear()
        run = kernel.execute(self._code, on_output=self._on_output, on_done=self._wake.set)
        try:
            await self._wait(kernel, run)
            if kernel.choice.runtime in LATE_OUTPUT_RUNTIMES and run.failure is None and not self._abandoned:
                # Output that arrives behind the idle status still belongs to this cell: wait
                # for an empty cell to round-trip before letting go of it.
                await kernel.run_silent("")
        finally:
            kernel.forget(run)
        if self._abandoned:
            return
        self._report_outcome(run)

    async def _wait(self, kernel: Kernel, run: CellRun) -> None:
        interrupted_at: float | None = None
        loop = asyncio.get_running_loop()
        while not run.done.is_set():
            if self._abandoned and interrupted_at is None:
                interrupted_at = loop.time()
                await kernel.interrupt()
            try:
                async with asyncio.timeout(LIVENESS_CHECK_SECONDS):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            if run.done.is_set():
                return
            if run.replied_at is not None and loop.time() - run.replied_at > IDLE_AFTER_REPLY_SECONDS:
                run.end_without_idle()
            elif not await kernel.is_alive():
                logger.warning("kernel of context %s died; restarting it", self.context.id)
                run.fail(
                    "UnexpectedEndOfExecution", "The kernel died while running the code; the context was restarted"
                )
                await self.context.restart()
            elif interrupted_at is not None and loop.time() - interrupted_at > INTERRUPT_GRACE_SECONDS:
                logger.warning("kernel of context %s ignored the interrupt; restarting it", self.context.id)
                await self.context.restart()

    def _on_output(self, msg: dict[str, Any]) -> None:
        size = droppable_size(msg)
        if size is not None and not self.output.has_room(size):
            return
        line = output_line(msg)
        if line is None:
            return
        if line["type"] == "error":
            if self._error_sent:
                return
            self._error_sent = True
        self.output.put(encode(line))

    def _report_outcome(self, run: CellRun) -> None:
        if run.failure is not None:
            name, value = run.failure
            self.output.put(encode(error_line(name, value, "")))
            return
        reply = run.reply or {}
        status = reply.get("status")
        if status == "error" and not self._error_sent:
            # Some kernels (Deno, tslab) report the error only in the reply.
            line = error_line(reply.get("ename", ""), reply.get("evalue", ""), reply.get("traceback") or [])
            self.output.put(encode(line))
        elif status == "abort":
            self.output.put(encode(error_line("ExecutionAborted", "Execution was aborted", "")))
