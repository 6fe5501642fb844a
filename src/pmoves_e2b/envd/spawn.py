"""Running a child as another user and getting told when it exits: one implementation for the
process service (``process/handle.py``) and sudo (``sudo.py``)."""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import functools
import os
import shlex
import shutil
import signal
import subprocess
import termios
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from . import SETPRIV_ENV, SPAWN_HELPER, SPAWN_LIBRARY
from .users import User

# Debian's secure_path: where envd (root) looks for its own helper, whatever PATH it was given.
SECURE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# A command joins its cgroup and raises its oom_score_adj (no privilege needed to raise) before its
# first instruction: when the sandbox runs out of memory the kernel kills commands before envd.
COMMAND_OOM_SCORE_ADJ = 500
_JOIN = f'echo 0 > "$0/cgroup.procs" && echo {COMMAND_OOM_SCORE_ADJ} > /proc/self/oom_score_adj && exec "$@"'


@functools.cache
def _helper() -> str | None:
    """The template's static spawn helper (spawn_helper.c), absent where envd runs elsewhere."""
    return SPAWN_HELPER if os.access(SPAWN_HELPER, os.X_OK) else None


@functools.cache
def _setpriv() -> list[str] | None:
    if configured := os.environ.get(SETPRIV_ENV):
        return shlex.split(configured)
    found = shutil.which("setpriv", path=SECURE_PATH)
    return [found] if found else None


def command_argv(argv: list[str], user: User, cgroup: str | None = None) -> tuple[list[str], dict[str, Any]]:
    """The argv and Popen credential options that run ``argv`` as ``user``, inside the cgroup2 group
    ``cgroup`` from its first instruction when one is given.

    Popen(user=...) makes CPython fork() instead of vfork(); forking envd's whole address space
    costs ~10 ms per command under load. So the child execs a helper that switches group and
    credentials right before exec'ing the command, and the spawn stays a cheap vfork: the template's
    pmoves-spawn (one exec), else ``sh`` to join the group and util-linux ``setpriv``.
    """
    switch = not user.is_current()
    if cgroup is None and not switch:
        return argv, {}
    if helper := _helper():
        options = [f"--cgroup={cgroup}", f"--oom-score-adj={COMMAND_OOM_SCORE_ADJ}"] if cgroup else []
        if switch:
            groups = ",".join(map(str, user.groups()))
            options += [f"--uid={user.uid}", f"--gid={user.gid}", f"--groups={groups}"]
        return [helper, *options, "--", *argv], {}
    credentials: dict[str, Any] = {}
    if switch:
        if (setpriv := _setpriv()) is not None:
            argv = [*setpriv, f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups", "--", *argv]
        else:
            credentials = {"user": user.uid, "group": user.gid, "extra_groups": user.groups()}
    if cgroup is not None:
        argv = ["/bin/sh", "-c", _JOIN, cgroup, *argv]
    return argv, credentials


class Child(Protocol):
    """A started child: ``subprocess.Popen`` or ``Spawned``."""

    pid: int
    returncode: Any


@dataclass
class Spawned:
    """A child started by the template's spawn library (``spawn_library.c``)."""

    pid: int
    returncode: int | None = None


# The steps of spawn_library.c, for the error a failed one raises.
_STEPS = (
    "",
    "setsid",
    "controlling terminal",
    "fds 0-2",
    "cwd",
    "cgroup",
    "oom_score_adj",
    "groups",
    "gid",
    "uid",
    "exec",
)


@functools.cache
def _library() -> Any:
    """The template's spawn library (spawn_library.c), absent where envd runs elsewhere."""
    try:
        library = ctypes.CDLL(SPAWN_LIBRARY)
    except OSError:
        return None
    strings, ints = ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_int)
    library.pmoves_spawn.restype = ctypes.c_int
    library.pmoves_spawn.argtypes = [
        *(strings, strings, strings, ctypes.c_char_p),  # paths, argv, envp, cwd
        *(ctypes.c_int,) * 3,  # fds 0-2
        *(ctypes.c_char_p, ctypes.c_char_p),  # cgroup.procs, oom_score_adj
        *(ctypes.c_int, ctypes.c_long, ctypes.c_long, ctypes.POINTER(ctypes.c_uint), ctypes.c_int),  # ids
        *(ctypes.c_int, ints, ints),  # controlling tty, signals to default, error
    ]
    return library


def direct() -> bool:
    """Whether ``spawn`` starts commands in envd's own process (no helper exec, no Popen)."""
    return _library() is not None


def _strings(items: list[bytes]) -> Any:
    """A NULL-ended char* array; C would cut a string at a NUL, so that is refused as Popen does."""
    if any(b"\0" in item for item in items):
        raise ValueError("embedded null byte")
    return (ctypes.c_char_p * (len(items) + 1))(*items, None)


def spawn(
    argv: list[str],
    user: User,
    cgroup: str | None,
    *,
    fds: tuple[int | None, int, int],
    cwd: str,
    env: dict[str, str],
    controlling_tty: bool = False,
) -> Child:
    """Start ``argv`` as ``user`` in its own session, inside the cgroup2 group ``cgroup`` from its
    first instruction when one is given, with ``fds`` as its 0-2 (stdin None: /dev/null); ``cwd`` and
    ``env`` as given, the PATH search ``subprocess`` does. With the template's spawn library, one
    vfork-like clone and the command's own exec; else ``subprocess.Popen`` of ``command_argv``."""
    library = _library()
    if library is None:
        return _popen(argv, user, cgroup, fds=fds, cwd=cwd, env=env, controlling_tty=controlling_tty)
    program = os.fsencode(argv[0])
    if os.path.dirname(program):
        paths = [program]
    else:
        paths = [os.path.join(os.fsencode(folder), program) for folder in os.get_exec_path(env)]
    switch = not user.is_current()
    groups = user.groups() if switch else []
    # What Popen(restore_signals=True) and its child's handler reset give a command: SIG_DFL for
    # SIGPIPE and SIGXFSZ (Python ignores them) and for every signal envd handles.
    to_default = {signal.SIGPIPE, signal.SIGXFSZ}
    to_default.update(sig for sig in signal.valid_signals() if callable(signal.getsignal(sig)))
    if any("=" in key for key in env):
        raise ValueError("illegal environment variable name")  # as Popen refuses it
    stdin = fds[0] if fds[0] is not None else os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    error = (ctypes.c_int * 2)()
    try:
        pid = library.pmoves_spawn(
            _strings(paths),
            _strings([os.fsencode(arg) for arg in argv]),
            _strings([os.fsencode(f"{key}={value}") for key, value in env.items()]),
            os.fsencode(cwd),
            stdin,
            fds[1],
            fds[2],
            os.fsencode(f"{cgroup}/cgroup.procs") if cgroup is not None else None,
            str(COMMAND_OOM_SCORE_ADJ).encode() if cgroup is not None else None,
            int(switch),
            user.uid,
            user.gid,
            (ctypes.c_uint * max(len(groups), 1))(*groups),
            len(groups),
            int(controlling_tty),
            (ctypes.c_int * (len(to_default) + 1))(*sorted(to_default), 0),
            error,
        )
    finally:
        if fds[0] is None:
            os.close(stdin)
    if pid < 0:
        step, code = error[0], error[1]
        if _STEPS[step] == "exec":
            raise OSError(code, os.strerror(code), argv[0])
        raise OSError(code, f"{os.strerror(code)} ({_STEPS[step]} of {argv[0]!r})")
    return Spawned(pid)


def _popen(
    argv: list[str],
    user: User,
    cgroup: str | None,
    *,
    fds: tuple[int | None, int, int],
    cwd: str,
    env: dict[str, str],
    controlling_tty: bool,
) -> subprocess.Popen[bytes]:
    argv, credentials = command_argv(argv, user, cgroup)
    return subprocess.Popen(
        argv,
        stdin=fds[0] if fds[0] is not None else subprocess.DEVNULL,
        stdout=fds[1],
        stderr=fds[2],
        cwd=cwd,
        env=env,
        # Own session and process group: a user's `kill 0` cannot reach envd, and shutdown can end a
        # command with everything it started.
        start_new_session=True,
        preexec_fn=_take_controlling_tty if controlling_tty else None,
        **credentials,
    )


def _take_controlling_tty() -> None:
    # Runs in the child after setsid(): make the PTY slave (fd 0) the controlling terminal,
    # so job control and Ctrl-C work in interactive shells.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def watch_exit(loop: asyncio.AbstractEventLoop, child: Child, on_exit: Callable[[int], None]) -> None:
    """Reap ``child`` when it exits and call ``on_exit(wait status)`` on ``loop``: a pidfd on the
    loop; where pidfd_open is unavailable (gVisor of 2022, old kernels, seccomp) a SIGCHLD handler on
    the loop, else a waiting thread. The child's ``returncode`` is set first, which keeps Popen from
    waiting for it again."""

    def finish(status: int) -> None:
        child.returncode = status
        on_exit(status)

    try:
        pidfd = os.pidfd_open(child.pid)
    except OSError:
        reaper = _reaper(loop)
        if reaper is not None:
            reaper.watch(child.pid, finish)
            return

        def wait_in_thread() -> None:
            _, status = os.waitpid(child.pid, 0)
            loop.call_soon_threadsafe(finish, status)

        threading.Thread(target=wait_in_thread, name=f"wait-{child.pid}", daemon=True).start()
        return

    def on_pidfd() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(child.pid, 0)
        finish(status)

    loop.add_reader(pidfd, on_pidfd)


class _SigchldReaper:
    """The children of one loop, reaped when SIGCHLD arrives (a signal handler on the loop): a
    thread per child cost ~0.4 ms to start under gVisor's ptrace platform, on every command. Only
    the pids it watches are waited for, so other children (a Popen's own wait) are left alone."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._children: dict[int, Callable[[int], None]] = {}

    def watch(self, pid: int, finish: Callable[[int], None]) -> None:
        self._children[pid] = finish
        self._loop.call_soon(self.reap)  # it may have ended before it was watched

    def reap(self) -> None:
        for pid, finish in list(self._children.items()):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # reaped by someone else (nothing of envd's does): status unknown
                done, status = pid, 255 << 8
            if done == pid:
                del self._children[pid]
                finish(status)


_reapers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _SigchldReaper | None] = weakref.WeakKeyDictionary()


def _reaper(loop: asyncio.AbstractEventLoop) -> _SigchldReaper | None:
    """The loop's SIGCHLD reaper; None when the loop cannot take signal handlers (not the main thread)."""
    if loop not in _reapers:
        reaper = _SigchldReaper(loop)
        try:
            loop.add_signal_handler(signal.SIGCHLD, reaper.reap)
            _reapers[loop] = reaper
        except (RuntimeError, ValueError, NotImplementedError):
            _reapers[loop] = None
    return _reapers[loop]
