"""Per-command cgroups: a command and everything it starts share one cgroup2 group.

The host delegates the sandbox's own cgroup2 group to root inside at /sys/fs/cgroup (ns backend).
Each command gets a child group ``cmd-N`` that it joins before its first instruction (through the
spawn helper, ``spawn.command_argv``, so the spawn stays a vfork), and
``cgroup.kill`` ends the whole tree: also the processes that left the command's process group or
session (``setsid``, GNU ``timeout``, a fork bomb's copies). Without the delegated group (envd on a
host, an older backend) commands fall back to their process group.

A command whose first process ended while its tree lives on (``server &``) keeps its group until
the tree is gone. When a new command finds the sandbox's processes near its pids.max
(``ENVD_PIDS_MAX``, set by the host) or cannot fork at all, ``reclaim_pids`` first kills the
largest such leftover tree: the way back from a fork bomb that outlived its command.
"""

from __future__ import annotations

import errno
import functools
import itertools
import os
import time
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
PIDS_MAX_ENV = "ENVD_PIDS_MAX"  # read when used: a zygote-forked envd gets its env after import
CROWDED = 0.9  # share of ENVD_PIDS_MAX at which a new command reclaims a leftover tree
_numbers = itertools.count(1)
_leftovers: set[Path] = set()


@functools.cache
def available() -> bool:
    return os.geteuid() == 0 and (ROOT / "cgroup.kill").exists() and os.access(ROOT / "cgroup.procs", os.W_OK)


class CommandGroup:
    """The cgroup of one command."""

    def __init__(self) -> None:
        sweep()
        if _crowded():
            reclaim_pids()
        while True:
            self.path = ROOT / f"cmd-{next(_numbers)}"
            try:
                self.path.mkdir()
                return
            except FileExistsError:
                continue  # left by an earlier envd of this sandbox

    def kill(self) -> None:
        _kill(self.path)

    def release(self) -> None:
        """The command's first process ended: remove the group, or keep it while its tree lives."""
        if not _remove(self.path):
            _leftovers.add(self.path)


def adopt_leftovers() -> int:
    """Take the groups an earlier envd of this sandbox left (it died and was restarted): their trees
    live on without a handle; like any leftover they are removed once ended and reclaimed first."""
    if not available():
        return 0
    found = [path for path in ROOT.glob("cmd-*") if path.is_dir()]
    _leftovers.update(found)
    sweep()
    return len(found)


def sweep() -> None:
    """Remove the groups of leftover trees that have ended since."""
    for path in list(_leftovers):
        if _remove(path):
            _leftovers.discard(path)


def reclaim_pids(timeout: float = 2.0) -> bool:
    """Kill the leftover tree with the most processes; True if one was killed (and is gone)."""
    sweep()
    sizes = {path: len(_procs(path)) for path in _leftovers}
    if not sizes or max(sizes.values()) == 0:
        return False
    largest = max(sizes, key=lambda path: sizes[path])
    _kill(largest)
    deadline = time.monotonic() + timeout
    while _populated(largest) and time.monotonic() < deadline:
        time.sleep(0.005)
    sweep()
    return True


def _crowded() -> bool:
    pids_max = int(os.environ.get(PIDS_MAX_ENV, "0") or 0)
    if not pids_max or not _leftovers:
        return False
    return sum(name.isdigit() for name in os.listdir("/proc")) >= pids_max * CROWDED


def _kill(path: Path) -> None:
    try:
        (path / "cgroup.kill").write_text("1")
    except FileNotFoundError:
        pass


def _procs(path: Path) -> list[str]:
    try:
        return (path / "cgroup.procs").read_text().split()
    except OSError:
        return []


def _populated(path: Path) -> bool:
    try:
        return "populated 1" in (path / "cgroup.events").read_text()
    except OSError:
        return False


def _remove(path: Path) -> bool:
    try:
        path.rmdir()
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno in (errno.EBUSY, errno.ENOTEMPTY):
            return False
        raise
    return True
