"""Code contexts: each one a kernel with its own working directory and state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from . import poll_only
from .kernel import IPC_RUNTIMES, Kernel, KernelStartError, remove_ipc_dir
from .kernelspecs import KernelCatalog, KernelChoice

logger = logging.getLogger(__name__)

# Run in a namespace of its own so that nothing it defines shows up in the user's variables.
_PYTHON_SETUP_SOURCE = Path(__file__).with_name("python_setup.py").read_text() + "\ninstall(get_ipython())\n"
PYTHON_SETUP_CELL = f"exec(compile({_PYTHON_SETUP_SOURCE!r}, '<pmoves-e2b setup>', 'exec'), {{}})"

# E2B's Java kernel (IJava on JDK 11) sends println's text and its line end as two stream messages
# (its PrintStream flushes per write); JDK 17 writes the line in one. The suites count on the former
# (stdout[0] == "Hello, World!"), so the kernel's out/err become PrintStream subclasses, which JDK 17
# still writes the old way. JJava resets System.out to these fields before every cell.
JAVA_SETUP_CELL = """{
    var io = org.dflib.jjava.kernel.JavaNotebookStatics.kernel().getIO();
    for (var name : new String[] {"out", "err"}) {
        var field = io.getClass().getField(name);
        field.setAccessible(true);
        var plain = (java.io.PrintStream) field.get(io);
        field.set(io, new java.io.PrintStream(plain, true, java.nio.charset.StandardCharsets.UTF_8) {});
    }
}"""


def kernel_environment() -> dict[str, str]:
    env = dict(os.environ)
    # matplotlib's inline backend sends figures as display_data (PNG + e2b/chart).
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    return env


@dataclass
class Context:
    id: str
    language: str
    cwd: str
    choice: KernelChoice
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Sandbox env vars (from envd) once applied in this kernel; None until then.
    sandbox_envs: dict[str, str] | None = None
    _kernel_task: asyncio.Task[Kernel] | None = None
    # Its kernel runs in a VM restored from a saved image and could not be reseeded in place: it is
    # replaced on first use (until then it costs nothing; no user code ran in it).
    _stale: bool = False
    # Reseeding its kernel after a restore (see restored): every use waits for it.
    _restoring: asyncio.Task[None] | None = None
    # A default context whose kernel starts on first use (see ContextRegistry.start_defaults).
    deferred: bool = False

    def as_json(self) -> dict[str, str]:
        return {"id": self.id, "language": self.language, "cwd": self.cwd}

    def start(self) -> asyncio.Task[Kernel]:
        self._kernel_task = asyncio.create_task(self._start_kernel())
        return self._kernel_task

    async def kernel(self) -> Kernel:
        task = self._kernel_task
        if task is None or (self.deferred and _failed(task)):  # a deferred start is tried again, as a create
            if not self.deferred:
                raise RuntimeError(f"context {self.id} used before start()")
            task = self.start()
        if self._restoring is not None:
            await self._restoring
        if self._stale:
            self._stale = False
            await self.restart()
            task = self._kernel_task or task
        return await task

    def restored(self) -> None:
        """Its VM was restored from a saved image (see Kernel.restored): reseed its kernel, or
        replace it on first use; until then its users wait."""
        if self._kernel_task is not None:
            self._restoring = asyncio.create_task(self._reseed(self._kernel_task, self._restoring))

    async def _reseed(self, task: asyncio.Task[Kernel], previous: asyncio.Task[None] | None) -> None:
        if previous is not None:  # one rekey at a time per kernel
            await previous
        try:
            kernel = await task
        except (KernelStartError, asyncio.CancelledError):
            return
        try:
            reseeded = await kernel.restored()
        except Exception:
            logger.exception("reseeding kernel %s after a restore failed; it is replaced", kernel.choice.kernel_name)
            reseeded = False
        if not reseeded:
            self._stale = True

    async def restart(self) -> None:
        """Replace the kernel: the state is lost, a running cell ends with ContextRestarting."""
        old_task = self._kernel_task
        self.sandbox_envs = None
        new_task = self.start()
        if old_task is not None:
            await _shutdown(old_task, "ContextRestarting", "Context was restarted")
        await new_task

    async def close(self) -> None:
        if self._kernel_task is not None:
            await _shutdown(self._kernel_task, "ContextRemoved", "Context was removed")

    async def _start_kernel(self) -> Kernel:
        kernel = await Kernel.start(self.choice, self.cwd, kernel_environment())
        if self.choice.runtime == "python":
            await kernel.run_silent(PYTHON_SETUP_CELL)
        elif self.choice.runtime == "java":
            await kernel.run_silent(JAVA_SETUP_CELL)
        return kernel


def _failed(task: asyncio.Task[Kernel]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is not None


async def _shutdown(task: asyncio.Task[Kernel], error_name: str, error_value: str) -> None:
    try:
        kernel = await task
    except (KernelStartError, asyncio.CancelledError):
        return
    kernel.fail_runs(error_name, error_value)
    await kernel.shutdown()


class ContextRegistry:
    def __init__(self, catalog: KernelCatalog, default_cwd: str) -> None:
        self.catalog = catalog
        self.default_cwd = default_cwd
        self._contexts: dict[str, Context] = {}
        # kernelspec name -> context id of the default context that `language=` runs in
        self._defaults: dict[str, str] = {}
        self._default_locks: dict[str, asyncio.Lock] = {}

    def get(self, context_id: str) -> Context | None:
        return self._contexts.get(context_id)

    def all(self) -> list[Context]:
        return list(self._contexts.values())

    async def create(self, language: str | None, cwd: str | None, *, deferred: bool = False) -> Context:
        """Start a new context (``deferred``: its kernel on first use); raises UnknownLanguageError,
        NotADirectoryError or KernelStartError."""
        choice = self.catalog.resolve(language)
        directory = cwd or self.default_cwd
        if not os.path.isdir(directory):
            raise NotADirectoryError(f"cwd {directory!r} is not an existing directory")
        context = Context(
            id=str(uuid.uuid4()), language=choice.language, cwd=directory, choice=choice, deferred=deferred
        )
        if not deferred:
            await context.start()
        self._contexts[context.id] = context
        return context

    async def default_for(self, language: str | None, *, deferred: bool = False) -> Context:
        """The shared context for a language, started on first use (``deferred``: made now, its
        kernel started on its first use)."""
        choice = self.catalog.resolve(language)
        lock = self._default_locks.setdefault(choice.kernel_name, asyncio.Lock())
        async with lock:
            context = self._contexts.get(self._defaults.get(choice.kernel_name, ""))
            if context is None:
                context = await self.create(choice.language, None, deferred=deferred)
                self._defaults[choice.kernel_name] = context.id
            return context

    def restored(self) -> None:
        """The server's VM was restored from a saved image that other sandboxes restore too: every
        kernel gets fresh random state and session keys before it runs any more code. Started here
        and awaited by each context's next use, so the host's create does not wait for it."""
        for context in self._contexts.values():
            context.restored()

    async def start_defaults(self, languages: list[str]) -> None:
        """Start default contexts for the languages whose kernel is installed, all at once. Where
        the sandbox is to be checkpointed (poll_only), a kernel that speaks TCP, which would keep
        it from ever being saved, starts on its context's first use instead (the context is listed
        as E2B's are)."""
        wanted: dict[str, bool] = {}  # language -> deferred
        for language in languages:
            with contextlib.suppress(LookupError):
                choice = self.catalog.resolve(language)
                wanted[language] = poll_only.enabled() and choice.runtime not in IPC_RUNTIMES
        results = await asyncio.gather(
            *(self.default_for(lang, deferred=deferred) for lang, deferred in wanted.items()), return_exceptions=True
        )
        for language, result in zip(wanted, results, strict=True):
            if isinstance(result, BaseException):
                logger.error("default %s context failed to start: %s", language, result)

    async def restart(self, context_id: str) -> bool:
        context = self._contexts.get(context_id)
        if context is None:
            return False
        await context.restart()
        return True

    async def remove(self, context_id: str) -> bool:
        context = self._contexts.pop(context_id, None)
        if context is None:
            return False
        for name, default_id in list(self._defaults.items()):
            if default_id == context_id:
                del self._defaults[name]
        await context.close()
        return True

    async def close_all(self) -> None:
        contexts, self._contexts = list(self._contexts.values()), {}
        self._defaults.clear()
        await asyncio.gather(*(context.close() for context in contexts), return_exceptions=True)
        remove_ipc_dir()
