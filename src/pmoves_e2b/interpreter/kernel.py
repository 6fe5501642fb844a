"""One Jupyter kernel process, driven directly over ZMQ with jupyter_client.

Two reader tasks (iopub and shell) hand every message to the `CellRun` it belongs to, found by the
parent message id, so several cells (set-up, the user's code, env clean-up) share one kernel.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio
from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.session import Session

from . import ipc_kernel, poll_only
from .kernelspecs import KernelChoice

logger = logging.getLogger(__name__)

KERNEL_READY_TIMEOUT_SECONDS = 60.0
IPC_RUNTIMES = ("python", "bash")  # their kernels are ipykernel's, which speak ipc (_speak_ipc)
SILENT_CELL_TIMEOUT_SECONDS = 30.0

Message = dict[str, Any]
OutputHandler = Callable[[Message], None]

# Run in a Python kernel of a VM restored from a saved image (see Kernel.restored): a fresh seed for
# the PRNGs seeded at import (every restored copy would draw the same numbers), and a new HMAC key
# for the kernel's messages (the saved image's key is in every copy). In its own namespace.
_RESTORED_SOURCE = """
import random, sys, tempfile
from IPython import get_ipython
random.seed()  # from os.urandom: the guest's kernel pool, reseeded by the host before this runs
tempfile._name_sequence = None  # its Random is made again on next use
if "numpy" in sys.modules:
    sys.modules["numpy"].random.seed()
get_ipython().kernel.session.key = KEY
"""


class KernelStartError(RuntimeError):
    pass


class CellRun:
    """One execute_request: done once the kernel is idle again and its reply has arrived."""

    def __init__(self, msg_id: str, on_output: OutputHandler | None, on_done: Callable[[], None] | None) -> None:
        self.msg_id = msg_id
        self.reply: Message | None = None
        self.replied_at: float | None = None
        self.failure: tuple[str, str] | None = None
        self.done = asyncio.Event()
        self._on_output = on_output
        self._on_done = on_done
        self._idle = False

    def handle_iopub(self, msg: Message) -> None:
        if msg["msg_type"] == "status":
            if msg["content"].get("execution_state") == "idle":
                self._idle = True
                self._check_done()
        elif self._on_output is not None:
            self._on_output(msg)

    def handle_reply(self, msg: Message) -> None:
        self.reply = msg["content"]
        self.replied_at = asyncio.get_running_loop().time()
        self._check_done()

    def end_without_idle(self) -> None:
        """Take the reply as the end: ZMQ drops iopub messages (the idle one too) under floods."""
        if self.reply is not None and not self.done.is_set():
            self._finish()

    def fail(self, name: str, value: str) -> None:
        """End the run without the kernel's word (kernel restarted, died or removed)."""
        if not self.done.is_set():
            self.failure = (name, value)
            self._finish()

    def _check_done(self) -> None:
        if self._idle and self.reply is not None and not self.done.is_set():
            self._finish()

    def _finish(self) -> None:
        self.done.set()
        if self._on_done is not None:
            self._on_done()


class Kernel:
    def __init__(
        self, manager: AsyncKernelManager, client: AsyncKernelClient, choice: KernelChoice, pipe: str | None = None
    ) -> None:
        self.choice = choice
        self._pipe = pipe  # its children's output pipe when it speaks ipc; None: its channels are TCP
        self._tcp = pipe is None
        self._manager = manager
        self._client = client
        self._runs: dict[str, CellRun] = {}
        self._readers: list[asyncio.Task[None]] = []
        self._closed = False
        # The key messages were signed with before restored() changed it (its cell's first messages).
        self._previous_session: Session | None = None

    @classmethod
    async def start(cls, choice: KernelChoice, cwd: str, env: dict[str, str]) -> Kernel:
        manager = AsyncKernelManager(kernel_name=choice.kernel_name)
        tcp = False
        try:
            pipe = _speak_ipc(manager, choice)
            if pipe is None:  # the JavaScript, R and Java kernels do not work over ipc: TCP on loopback
                manager.transport = "tcp"
                manager.ip = "127.0.0.1"
                tcp = True
                poll_only.tcp_kernel_starting()
            await manager.start_kernel(cwd=cwd, env=env)
        except Exception as error:
            if tcp:
                poll_only.tcp_kernel_ended()
            raise KernelStartError(f"kernel {choice.kernel_name!r} failed to start: {error}") from error
        client = manager.client()
        client.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=False)  # noqa: S604 - jupyter_client's channel flag, not a shell
        kernel = cls(manager, client, choice, pipe)
        try:
            await client.wait_for_ready(timeout=KERNEL_READY_TIMEOUT_SECONDS)
        except (RuntimeError, TimeoutError) as error:
            await kernel.shutdown()
            raise KernelStartError(f"kernel {choice.kernel_name!r} did not become ready: {error}") from error
        kernel._readers = [
            asyncio.create_task(kernel._read(client.iopub_channel.socket, kernel._dispatch_iopub)),
            asyncio.create_task(kernel._read(client.shell_channel.socket, kernel._dispatch_reply)),
        ]
        return kernel

    @property
    def pid(self) -> int | None:
        provisioner = self._manager.provisioner
        process = getattr(provisioner, "process", None)
        return getattr(process, "pid", None)

    def execute(
        self,
        code: str,
        *,
        silent: bool = False,
        on_output: OutputHandler | None = None,
        on_done: Callable[[], None] | None = None,
    ) -> CellRun:
        if self._closed:
            run = CellRun("", on_output, on_done)
            run.fail("ContextRestarting", "The kernel was shut down")
            return run
        msg_id = self._client.execute(
            code, silent=silent, store_history=not silent, allow_stdin=False, stop_on_error=False
        )
        run = CellRun(msg_id, on_output, on_done)
        self._runs[msg_id] = run
        return run

    def forget(self, run: CellRun) -> None:
        self._runs.pop(run.msg_id, None)

    async def run_silent(self, code: str, timeout: float = SILENT_CELL_TIMEOUT_SECONDS) -> bool:
        """Run set-up code with no output; True when the kernel ran it without an error."""
        return await self._finish_silent(self.execute(code, silent=True), timeout)

    async def _finish_silent(self, run: CellRun, timeout: float = SILENT_CELL_TIMEOUT_SECONDS) -> bool:
        """Wait for a silent set-up cell and forget it; True when the kernel ran it without an error."""
        try:
            async with asyncio.timeout(timeout):
                await run.done.wait()
        except TimeoutError:
            logger.warning("set-up cell timed out in kernel %s", self.choice.kernel_name)
            return False
        finally:
            self.forget(run)
        ok = run.failure is None and run.reply is not None and run.reply.get("status") == "ok"
        if not ok:
            logger.warning("set-up cell failed in kernel %s: %s", self.choice.kernel_name, run.reply)
        return ok

    async def restored(self) -> bool:
        """This kernel's VM was restored from a saved image that other sandboxes restore too: reseed
        its PRNGs and change its session key, in place (its state and warm imports are kept). Python
        kernels only: True when done; others cannot be reseeded from inside (V8's Math.random, Rust's
        thread RNG), so their context starts a new kernel instead."""
        if self.choice.runtime != "python":
            return False
        session = self._client.session  # shared with the manager (interrupts, shutdown)
        key = secrets.token_hex(32).encode()
        self._previous_session = Session(
            key=session.key, signature_scheme=session.signature_scheme, packer=session.packer, unpacker=session.unpacker
        )
        cell = f"exec(compile({_RESTORED_SOURCE!r}, '<pmoves-e2b restored>', 'exec'), {{'KEY': {key!r}}})"
        run = self.execute(cell, silent=True)
        # the kernel signs its reply with the new key; its busy status (sent before the cell ran)
        # with the old one, which _read still accepts until this run is done
        session.key = key
        ok = await self._finish_silent(run)
        if not ok:
            session.key = self._previous_session.key  # the kernel kept its key
        self._previous_session = None
        return ok

    async def interrupt(self) -> None:
        # Signal or interrupt_request message, as the kernelspec's interrupt_mode says.
        with contextlib.suppress(Exception):
            await self._manager.interrupt_kernel()

    async def is_alive(self) -> bool:
        return bool(await self._manager.is_alive())

    def fail_runs(self, name: str, value: str) -> None:
        for run in list(self._runs.values()):
            run.fail(name, value)

    async def shutdown(self) -> None:
        self._closed = True
        for reader in self._readers:
            reader.cancel()
        pid = self.pid
        self._client.stop_channels()
        with contextlib.suppress(Exception):
            await self._manager.shutdown_kernel(now=True)
        if pid is not None:
            # The kernel leads its own session; take its children (bash, node...) down with it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        if self._tcp:
            self._tcp = False
            poll_only.tcp_kernel_ended()
        if self._pipe is not None:  # jupyter_client removes the channels' socket files, not this one
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._pipe)

    async def _read(self, socket: zmq.asyncio.Socket, dispatch: Callable[[Message], None]) -> None:
        session = self._client.session
        while True:
            try:
                frames = await socket.recv_multipart()
                _, signed = session.feed_identities(frames)
                try:
                    msg = session.deserialize(signed)
                except ValueError:  # signed with the key restored() just replaced
                    if self._previous_session is None:
                        raise
                    msg = self._previous_session.deserialize(signed)
            except asyncio.CancelledError:
                raise
            except zmq.ZMQError:
                return  # socket closed at shutdown
            except Exception:
                logger.exception("dropping an unreadable message from kernel %s", self.choice.kernel_name)
                continue
            dispatch(msg)

    def _dispatch_iopub(self, msg: Message) -> None:
        run = self._runs.get(msg["parent_header"].get("msg_id", ""))
        if run is not None:
            run.handle_iopub(msg)

    def _dispatch_reply(self, msg: Message) -> None:
        if msg["msg_type"] != "execute_reply":
            return
        run = self._runs.get(msg["parent_header"].get("msg_id", ""))
        if run is not None:
            run.handle_reply(msg)


def _speak_ipc(manager: AsyncKernelManager, choice: KernelChoice) -> str | None:
    """Make an ipykernel kernel (the python and bash runtimes) use Unix sockets only, in a private
    directory: its channels over ipc, and the pipe its forked children send output through
    (``ipc_kernel``), whose path it returns; None (nothing changed) for other kernels. No TCP port
    of a kernel is then open to the sandbox's other users, and gVisor's checkpoint can save it
    (see poll_only)."""
    spec = manager.kernel_spec
    if spec is None:
        return None
    argv = list(spec.argv)
    # ipc_kernel is this package's: only a kernel on this server's own python can import it
    same_python = os.path.dirname(os.path.abspath(argv[0])) == os.path.dirname(os.path.abspath(sys.executable))
    if choice.runtime not in IPC_RUNTIMES or not same_python or not os.path.basename(argv[0]).startswith("python"):
        return None
    # where python's own options end: "-m module" or the script
    target = next((i for i, arg in enumerate(argv[1:], 1) if arg == "-m" or not arg.startswith("-")), None)
    if target is None:
        return None
    prefix = os.path.join(_ipc_dir(), secrets.token_hex(8))
    manager.transport = "ipc"
    manager.ip = prefix
    pipe = f"{prefix}-pipe"
    spec.argv = [*argv[:target], "-m", ipc_kernel.__name__, "--pipe", pipe, *argv[target:]]
    return pipe


@functools.cache
def _ipc_dir() -> str:
    """This server's directory for its kernels' sockets (0700; hidden, so that a user's
    ``rm -rf /tmp/*`` leaves it); ``remove_ipc_dir`` at shutdown."""
    return tempfile.mkdtemp(prefix=".pmoves-kernels-")


def remove_ipc_dir() -> None:
    """Once every kernel has shut down (uvicorn ends the process by its signal: no atexit runs)."""
    if _ipc_dir.cache_info().currsize:
        shutil.rmtree(_ipc_dir(), ignore_errors=True)
        _ipc_dir.cache_clear()
