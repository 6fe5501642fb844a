"""Running a child as another user and getting told when it exits: one implementation for the
process service (``process/handle.py``) and sudo (``sudo.py``)."""

from __future__ import annotations

import asyncio
import functools
import os
import shlex
import shutil
import subprocess
import threading
from collections.abc import Callable
from typing import Any

from . import SETPRIV_ENV, SPAWN_HELPER
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


def watch_exit(loop: asyncio.AbstractEventLoop, child: subprocess.Popen[bytes], on_exit: Callable[[int], None]) -> None:
    """Reap ``child`` when it exits and call ``on_exit(wait status)`` on ``loop``: a pidfd on the
    loop, or a waiting thread where pidfd_open is unavailable (old kernel, seccomp). The child's
    ``returncode`` is set first, which keeps Popen from waiting for it again."""

    def finish(status: int) -> None:
        child.returncode = status
        on_exit(status)

    try:
        pidfd = os.pidfd_open(child.pid)
    except OSError:

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
