"""Per-sandbox cgroups on this machine's hybrid hierarchy (the only module touching /sys/fs/cgroup).

Limits live in cgroup v1 (memory, cpu, pids); a cgroup2 leaf under /sys/fs/cgroup/unified gives
``cgroup.kill``, ``cgroup.freeze`` and ``cgroup.events`` (liveness). Every group is created under
``<this process's own path>/<parent_name>/<sandbox id>`` in each hierarchy: the daemon runs in a
non-root memory cgroup here, and nesting under it keeps an OOM inside the sandbox's group.
"""

from __future__ import annotations

import errno
import os
import select
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
V1_CONTROLLERS = ("memory", "cpu", "pids")
UNIFIED = "unified"
CFS_PERIOD_US = 100_000
MAX_DESCENDANTS = 512  # child groups a sandbox may make in its delegated cgroup2 group
MAX_DEPTH = 2


class CgroupError(RuntimeError):
    pass


def _own_paths() -> dict[str, str]:
    """Controller (or "unified") → this process's cgroup path, from /proc/self/cgroup."""
    paths: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            paths[UNIFIED] = path
        for controller in controllers.split(","):
            paths[controller] = path
    return paths


def parent_dirs(parent_name: str) -> dict[str, Path]:
    """Where this process puts the sandbox groups, one dir per hierarchy."""
    own = _own_paths()
    dirs = {}
    for hierarchy in (*V1_CONTROLLERS, UNIFIED):
        dirs[hierarchy] = CGROUP_ROOT / hierarchy / own.get(hierarchy, "/").lstrip("/") / parent_name
    return dirs


def cap_parent_pids(parents: dict[str, Path], limit: int) -> None:
    """Cap the pids of all sandboxes under ``parents`` together (each also has its own pids.max)."""
    parent = parents["pids"]
    parent.mkdir(exist_ok=True)
    _write(parent / "pids.max", str(limit))


@dataclass(frozen=True)
class SandboxCgroups:
    """The four groups of one sandbox, by absolute path (stored in the handle, so re-adoptable)."""

    memory: Path
    cpu: Path
    pids: Path
    unified: Path

    @classmethod
    def under(cls, parents: dict[str, Path], sandbox_id: str) -> SandboxCgroups:
        return cls(**{h: parents[h] / sandbox_id for h in (*V1_CONTROLLERS, UNIFIED)})

    @classmethod
    def from_dict(cls, data: dict[str, str]) -> SandboxCgroups:
        return cls(**{key: Path(value) for key, value in data.items()})

    def to_dict(self) -> dict[str, str]:
        return {key: str(value) for key, value in self.__dict__.items()}

    def all(self) -> tuple[Path, ...]:
        return (self.memory, self.cpu, self.pids, self.unified)

    # --- creation -------------------------------------------------------------------------

    def create(self, memory_mb: int, cpu_count: float, pids_max: int) -> None:
        for path in self.all():
            path.parent.mkdir(exist_ok=True)
            path.mkdir(exist_ok=True)
        limit = str(memory_mb * 1024 * 1024)
        _write(self.memory / "memory.limit_in_bytes", limit)
        memsw = self.memory / "memory.memsw.limit_in_bytes"
        if memsw.exists():  # no swap for sandboxes: memory+swap == memory
            _write(memsw, limit)
        _write(self.memory / "memory.swappiness", "0")
        _write(self.cpu / "cpu.cfs_period_us", str(CFS_PERIOD_US))
        _write(self.cpu / "cpu.cfs_quota_us", str(max(1000, int(cpu_count * CFS_PERIOD_US))))
        _write(self.pids / "pids.max", str(pids_max))

    def delegate(self, uid: int) -> None:
        """Hand the cgroup2 group to root inside (host ``uid``), as systemd delegates: it may make
        child groups (envd: one per command, so a kill takes a command's whole tree) and move its
        own processes between them. Limits stay in the root-owned files: at most
        ``MAX_DESCENDANTS`` groups, ``MAX_DEPTH`` levels; the v1 limits are not affected."""
        _write(self.unified / "cgroup.max.descendants", str(MAX_DESCENDANTS))
        _write(self.unified / "cgroup.max.depth", str(MAX_DEPTH))
        for path in (self.unified, self.unified / "cgroup.procs"):
            os.chown(path, uid, uid)

    def procs_files(self) -> tuple[Path, ...]:
        """The cgroup.procs files a new process writes its pid into to join every group."""
        return tuple(path / "cgroup.procs" for path in self.all())

    # --- state ----------------------------------------------------------------------------

    def _events(self) -> dict[str, str]:
        try:
            return _parse_events((self.unified / "cgroup.events").read_text())
        except FileNotFoundError:
            return {}

    def populated(self) -> bool:
        return self._events().get("populated") == "1"

    def frozen(self) -> bool:
        return self._events().get("frozen") == "1"

    def contains(self, pid: int) -> bool:
        """True if ``pid`` is a process of this sandbox (guards against pid reuse)."""
        try:
            text = Path(f"/proc/{pid}/cgroup").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return False
        own = "0::/" + str(self.unified.relative_to(CGROUP_ROOT / UNIFIED))
        return own in text.splitlines()

    def freeze(self, frozen: bool, timeout: float = 5.0) -> None:
        want = "1" if frozen else "0"
        _write(self.unified / "cgroup.freeze", want)
        if not _wait_for_event(self.unified, "frozen", want, timeout):
            raise CgroupError(f"cgroup {self.unified} did not reach frozen={want} within {timeout}s")

    def wait_empty(self, timeout: float) -> bool:
        return _wait_for_event(self.unified, "populated", "0", timeout)

    def kill(self, timeout: float = 5.0) -> bool:
        """SIGKILL every process (frozen ones too) and wait until the groups are empty."""
        deadline = time.monotonic() + timeout
        try:
            _write(self.unified / "cgroup.kill", "1")
        except FileNotFoundError:
            pass
        return self.wait_empty(timeout) and _wait(lambda: not self._v1_tasks(), max(0.0, deadline - time.monotonic()))

    def _v1_tasks(self) -> bool:
        for path in (self.memory, self.cpu, self.pids):
            try:
                if (path / "cgroup.procs").read_text().strip():
                    return True
            except FileNotFoundError:
                continue
        return False

    def pids_in(self) -> list[int]:
        try:
            return [int(pid) for pid in (self.pids / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return []

    def remove(self, timeout: float = 2.0) -> None:
        """rmdir every group; EBUSY while the last processes exit is retried until ``timeout``."""
        deadline = time.monotonic() + timeout
        _remove_children(self.unified)
        for path in self.all():
            while True:
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise CgroupError(f"cannot remove cgroup {path}: {exc}") from exc
                    time.sleep(0.002)

    # --- usage ----------------------------------------------------------------------------

    def cpu_usage_usec(self) -> int:
        for line in (self.unified / "cpu.stat").read_text().splitlines():
            key, value = line.split()
            if key == "usage_usec":
                return int(value)
        return 0

    def memory_usage(self) -> tuple[int, int]:
        """(bytes used without page cache reclaimable by the kernel, limit in bytes)."""
        stat = dict(line.split() for line in (self.memory / "memory.stat").read_text().splitlines())
        usage = int((self.memory / "memory.usage_in_bytes").read_text())
        reclaimable = int(stat.get("total_inactive_file", 0))
        limit = int((self.memory / "memory.limit_in_bytes").read_text())
        return max(0, usage - reclaimable), limit

    def oom_kills(self) -> int:
        for line in (self.memory / "memory.oom_control").read_text().splitlines():
            key, value = line.split()
            if key == "oom_kill":
                return int(value)
        return 0


def existing_parent_dirs(parent_name: str, max_depth: int = 4) -> list[Path]:
    """Every group named ``parent_name`` in any hierarchy: the service that made a sandbox may
    have run in another memory cgroup than the process cleaning up (e.g. ``pmoves-e2b down``)."""
    found: list[Path] = []
    for hierarchy in (*V1_CONTROLLERS, UNIFIED):
        level = [CGROUP_ROOT / hierarchy]
        for _ in range(max_depth):
            next_level = []
            for directory in level:
                try:
                    entries = [entry for entry in os.scandir(directory) if entry.is_dir()]
                except OSError:
                    continue
                for entry in entries:
                    if entry.name == parent_name:
                        found.append(Path(entry.path))
                    elif not entry.name.startswith("pmoves-e2b-"):  # never walk into sandbox groups
                        next_level.append(Path(entry.path))
            level = next_level
    return found


def children(parents: list[Path]) -> dict[str, list[Path]]:
    """Sandbox id → its groups under the given parents."""
    groups: dict[str, list[Path]] = {}
    for parent in parents:
        try:
            entries = [entry for entry in os.scandir(parent) if entry.is_dir()]
        except FileNotFoundError:
            continue
        for entry in entries:
            groups.setdefault(entry.name, []).append(Path(entry.path))
    return groups


def kill_and_remove(groups: list[Path], timeout: float = 5.0) -> None:
    """End every process of a sandbox known only by its groups, then remove the groups."""
    for group in groups:
        if (group / "cgroup.kill").exists():
            _write(group / "cgroup.kill", "1")
            if not _wait_for_event(group, "populated", "0", timeout):
                raise CgroupError(f"processes still in {group} after cgroup.kill")
    for group in groups:
        _remove_children(group)
        try:
            group.rmdir()
        except FileNotFoundError:
            pass


def remove_parents(parents: list[Path]) -> None:
    """Remove the (empty) parent groups; a parent that still has sandboxes stays."""
    for parent in parents:
        try:
            parent.rmdir()
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.EBUSY, errno.ENOTEMPTY):
                raise


def _remove_children(group: Path) -> None:
    """rmdir the (empty) child groups a sandbox made in its delegated group, deepest first."""
    try:
        entries = [entry for entry in os.scandir(group) if entry.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return
    for entry in entries:
        _remove_children(Path(entry.path))
        try:
            os.rmdir(entry.path)
        except FileNotFoundError:
            pass


def _write(path: Path, value: str) -> None:
    with open(path, "w") as handle:
        handle.write(value)


def _parse_events(text: str) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in text.splitlines())


def _wait_for_event(group: Path, key: str, want: str, timeout: float) -> bool:
    """Until the cgroup2 ``group``'s ``cgroup.events`` says ``key want``, asleep in poll(): the
    kernel wakes it when a value there changes (a loop of reads cost ~0.4 ms of CPU each)."""
    deadline = time.monotonic() + timeout
    try:
        fd = os.open(group / "cgroup.events", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return want == "0"  # no group: nothing runs in it, nothing is frozen
    try:
        poller = select.poll()
        poller.register(fd, select.POLLPRI)
        while True:
            os.lseek(fd, 0, os.SEEK_SET)
            if _parse_events(os.read(fd, 4096).decode()).get(key) == want:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            poller.poll(min(remaining, 0.05) * 1000)  # capped: a change is never missed for long
    finally:
        os.close(fd)


def _wait(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while True:
        if condition():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.01)
