"""One live process: spawn (pipes or a real PTY), fan its output out, report its end.

Everything is driven by the event loop's fd readiness (output pipes, the PTY master and a
pidfd for the exit), so a process costs no thread. Subscribers (Start/Connect streams) get
events only from the moment they subscribe: reconnecting replays nothing.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import shutil
import signal
import struct
import termios
from collections.abc import Callable
from dataclasses import dataclass

from protobuf import Oneof

from .. import spawn
from ..gen.process.process_pb import ProcessConfig, ProcessEvent
from ..spawn import Child, watch_exit
from ..users import User
from . import cgroup, tty_signals

STD_CHUNK = 32 << 10
PTY_CHUNK = 16 << 10
HIGH_WATER_CHUNKS = 64
LOW_WATER_CHUNKS = 16
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class InputError(RuntimeError):
    """Input cannot be delivered (no stdin, stdin closed, wrong channel for a PTY)."""


@dataclass(frozen=True)
class SpawnSpec:
    cmd: str
    args: list[str]
    env: dict[str, str]
    cwd: str
    user: User
    pty_size: tuple[int, int] | None  # (cols, rows)
    stdin: bool


def build_env(user: User, sandbox_env: dict[str, str], request_env: dict[str, str]) -> dict[str, str]:
    """E2B's order: envd's PATH, the user's identity, sandbox env vars, then the request's."""
    env = {
        "PATH": os.environ.get("PATH", DEFAULT_PATH),
        "HOME": user.home,
        "USER": user.name,
        "LOGNAME": user.name,
    }
    env.update(sandbox_env)
    env.update(request_env)
    return env


def _check_executable(spec: SpawnSpec) -> None:
    command = os.path.join(spec.cwd, spec.cmd) if "/" in spec.cmd else spec.cmd
    if shutil.which(command, path=spec.env.get("PATH", DEFAULT_PATH)) is None:
        if os.path.exists(command):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), spec.cmd)
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), spec.cmd)


def _set_winsize(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _data_event(stream: str, data: bytes) -> ProcessEvent:
    return ProcessEvent(event=Oneof("data", ProcessEvent.DataEvent(output=Oneof(stream, data))))


def _exit_info(status: int) -> ProcessEvent.EndEvent:
    # Mirrors Go's os.ProcessState: "exit status N" / "signal: killed", exit code -1 on signal.
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = (signal.strsignal(sig) or f"signal {sig}").lower()
        text = f"signal: {name}" + (" (core dumped)" if os.WCOREDUMP(status) else "")
        return ProcessEvent.EndEvent(exit_code=-1, exited=False, status=text, error=text)
    code = os.WEXITSTATUS(status)
    text = f"exit status {code}"
    end = ProcessEvent.EndEvent(exit_code=code, exited=True, status=text)
    if code != 0:
        end.error = text
    return end


class ProcessHandle:
    """A started process with its output fds registered on the running loop."""

    def __init__(self, spec: SpawnSpec, config: ProcessConfig, tag: str | None) -> None:
        self.config = config
        self.tag = tag
        self._loop = asyncio.get_running_loop()
        self._subscribers: set[asyncio.Queue[ProcessEvent | None]] = set()
        self._outputs: dict[int, str] = {}
        self._stdin_fd: int | None = None
        self._pty_fd: int | None = None
        self._write_lock = asyncio.Lock()
        self._on_end: list[Callable[[ProcessHandle], None]] = []
        self._kill_timer: asyncio.TimerHandle | None = None
        self._has_pty = spec.pty_size is not None
        self.deadline_exceeded = False  # killed by its Connect deadline, not by a signal from a user
        self._paused = False
        self._write_waiter: asyncio.Future[None] | None = None
        self.end: ProcessEvent.EndEvent | None = None
        self._group = cgroup.CommandGroup() if cgroup.available() else None
        try:
            self._popen = self._spawn(spec)
        except BaseException:
            if self._group is not None:
                self._group.release()
            raise
        self.pid: int = self._popen.pid
        watch_exit(self._loop, self._popen, self._on_exit)
        for fd in self._outputs:
            os.set_blocking(fd, False)
            self._loop.add_reader(fd, self._on_readable, fd)

    def _spawn(self, spec: SpawnSpec) -> Child:
        if self._group is not None and not spawn.direct():
            _check_executable(spec)  # the helper would report a missing command as exit 127
        cgroup = str(self._group.path) if self._group is not None else None
        argv = [spec.cmd, *spec.args]
        if spec.pty_size is not None:
            master, slave = os.openpty()
            try:
                _set_winsize(slave, *spec.pty_size)
                child = spawn.spawn(
                    argv, spec.user, cgroup, fds=(slave, slave, slave), cwd=spec.cwd, env=spec.env, controlling_tty=True
                )
            except BaseException:
                os.close(master)
                raise
            finally:
                os.close(slave)
            self._pty_fd = master
            self._outputs[master] = "pty"
            return child
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        in_r, in_w = os.pipe2(os.O_CLOEXEC) if spec.stdin else (None, None)
        try:
            # In its own session (spawn.spawn): a user's `kill 0` cannot reach envd, and shutdown
            # can end a command with everything it started.
            child = spawn.spawn(argv, spec.user, cgroup, fds=(in_r, out_w, err_w), cwd=spec.cwd, env=spec.env)
        except BaseException:
            for fd in (out_r, err_r, in_w):
                if fd is not None:
                    os.close(fd)
            raise
        finally:
            for fd in (out_w, err_w, in_r):
                if fd is not None:
                    os.close(fd)
        self._outputs = {out_r: "stdout", err_r: "stderr"}
        if in_w is not None:
            os.set_blocking(in_w, False)
            self._stdin_fd = in_w
        return child

    # --- subscriptions -------------------------------------------------------------------

    def subscribe(self) -> asyncio.Queue[ProcessEvent | None]:
        queue: asyncio.Queue[ProcessEvent | None] = asyncio.Queue()
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[ProcessEvent | None]) -> None:
        self._subscribers.discard(queue)
        self.resume_if_drained()

    def on_end(self, callback: Callable[[ProcessHandle], None]) -> None:
        self._on_end.append(callback)

    def _publish(self, event: ProcessEvent) -> None:
        for queue in self._subscribers:
            queue.put_nowait(event)
            if queue.qsize() > HIGH_WATER_CHUNKS and not self._paused:
                self._pause_reading()

    # Backpressure: a slow stream stops envd reading the process's output, so the pipe fills
    # and the process blocks (as with E2B's bounded channels) instead of envd buffering it all.

    def _pause_reading(self) -> None:
        self._paused = True
        for fd in self._outputs:
            self._loop.remove_reader(fd)

    def resume_if_drained(self) -> None:
        if self._paused and all(q.qsize() <= LOW_WATER_CHUNKS for q in self._subscribers):
            self._paused = False
            for fd in self._outputs:
                self._loop.add_reader(fd, self._on_readable, fd)

    # --- output and exit -----------------------------------------------------------------

    def _on_readable(self, fd: int) -> None:
        try:
            data = os.read(fd, PTY_CHUNK if fd == self._pty_fd else STD_CHUNK)
        except BlockingIOError:
            return
        except OSError:  # EIO on the PTY master once the last slave fd closes
            data = b""
        if data:
            self._publish(_data_event(self._outputs[fd], data))
        else:
            self._close_output(fd)

    def _close_output(self, fd: int) -> None:
        self._loop.remove_reader(fd)
        self._outputs.pop(fd, None)
        if fd != self._pty_fd:
            os.close(fd)

    def _drain(self) -> None:
        """Read what the exited process left in its pipes, then stop reading them."""
        for fd in list(self._outputs):
            while fd in self._outputs:
                try:
                    data = os.read(fd, STD_CHUNK)
                except (BlockingIOError, OSError):
                    data = b""
                if not data:
                    self._close_output(fd)
                    break
                self._publish(_data_event(self._outputs[fd], data))

    def _on_exit(self, status: int) -> None:
        if self._kill_timer is not None:
            self._kill_timer.cancel()
        self._drain()
        self._close_input()
        self.end = _exit_info(status)
        if self._has_pty:
            tty_signals.forget(self.pid)
        self._publish(ProcessEvent(event=Oneof("end", self.end)))
        if self._group is not None:
            self._group.release()
        for callback in self._on_end:
            callback(self)

    # --- control -------------------------------------------------------------------------

    def signal(self, sig: int) -> None:
        if self.end is None:
            if sig == signal.SIGKILL:
                self.kill_tree()
            else:
                os.kill(self.pid, sig)

    def kill_tree(self) -> None:
        """SIGKILL the command and everything it started: its cgroup (also what left its process
        group or session), else its process group. What is left would keep the sandbox's pids."""
        if self.end is not None:
            return
        if self._group is not None:
            self._group.kill()
            return
        os.killpg(self.pid, signal.SIGKILL)

    def kill_group(self) -> None:
        """SIGKILL the process and everything it started (envd shutdown)."""
        try:
            self.kill_tree()
        except ProcessLookupError:
            pass

    def kill_after(self, seconds: float) -> None:
        """Enforce a Connect deadline: SIGKILL the process when it passes."""
        self._kill_timer = self._loop.call_later(seconds, self._kill_at_deadline)

    def _kill_at_deadline(self) -> None:
        if self.end is None:
            self.deadline_exceeded = True
            self.signal(signal.SIGKILL)

    def resize(self, cols: int, rows: int) -> None:
        if self._pty_fd is None:
            raise InputError("tty not assigned to process")
        _set_winsize(self._pty_fd, cols, rows)

    async def write_stdin(self, data: bytes) -> None:
        if self._pty_fd is not None:
            raise InputError("tty assigned to process: input should be written to the pty, not the stdin")
        await self._write(lambda: self._stdin_fd, data, "stdin not enabled or closed")

    async def write_pty(self, data: bytes) -> None:
        if self._pty_fd is None and self.end is None:
            raise InputError("tty not assigned to process: input should be written to the stdin, not the tty")
        parts = tty_signals.split(self._pty_fd, data) if self._pty_fd is not None else [data]
        for part in parts:
            if isinstance(part, bytes):
                await self._write(lambda: self._pty_fd, part, "process has ended")
            elif self.end is None:
                tty_signals.send(self.pid, part)  # this kernel's terminal would not

    def close_stdin(self) -> None:
        if self._pty_fd is not None:
            raise InputError("cannot close stdin for PTY process: send Ctrl+D (0x04) instead")
        self._close_input()

    def _close_input(self) -> None:
        """Close stdin / the PTY master, first waking a writer waiting on it (it then fails)."""
        for fd in (self._stdin_fd, self._pty_fd):
            if fd is None:
                continue
            if self._write_waiter is not None:
                self._loop.remove_writer(fd)
                if not self._write_waiter.done():
                    self._write_waiter.set_result(None)
            os.close(fd)
        self._stdin_fd = self._pty_fd = None

    async def _write(self, current_fd: Callable[[], int | None], data: bytes, closed: str) -> None:
        async with self._write_lock:
            view = memoryview(data)
            while view:
                fd = current_fd()
                if fd is None:
                    raise InputError(closed)
                try:
                    view = view[os.write(fd, view) :]
                except BlockingIOError:
                    await self._wait_writable(fd)
                except BrokenPipeError as exc:
                    raise InputError("process closed its input") from exc

    async def _wait_writable(self, fd: int) -> None:
        ready: asyncio.Future[None] = self._loop.create_future()
        self._write_waiter = ready
        self._loop.add_writer(fd, lambda: None if ready.done() else ready.set_result(None))
        try:
            await ready
        finally:
            self._write_waiter = None
            if fd in (self._stdin_fd, self._pty_fd):
                self._loop.remove_writer(fd)
