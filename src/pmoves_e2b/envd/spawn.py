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

from . import SETPRIV_ENV
from .users import User

# Debian's secure_path: where envd (root) looks for its own helper, whatever PATH it was given.
SECURE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@functools.cache
def _setpriv() -> list[str] | None:
    if configured := os.environ.get(SETPRIV_ENV):
        return shlex.split(configured)
    found = shutil.which("setpriv", path=SECURE_PATH)
    return [found] if found else None


def as_user(argv: list[str], user: User) -> tuple[list[str], dict[str, Any]]:
    """The argv and Popen credential options that run ``argv`` as ``user``.

    Popen(user=...) makes CPython fork() instead of vfork(); forking envd's whole address space
    costs ~10 ms per command under load. util-linux ``setpriv`` switches uid/gid/groups right
    before exec instead, so the spawn stays a cheap vfork.
    """
    if user.is_current():
        return argv, {}
    helper = _setpriv()
    if helper is not None:
        return [*helper, f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups", "--", *argv], {}
    return argv, {"user": user.uid, "group": user.gid, "extra_groups": user.groups()}


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
