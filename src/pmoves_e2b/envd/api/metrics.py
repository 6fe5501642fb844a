"""``GET /metrics``: this sandbox's CPU, memory and disk as seen from inside.

Prefers the sandbox's own cgroup (v2 ``cpu.stat``/``memory.current``/``memory.max``, or v1
``cpuacct``/``memory``) when it is mounted. Without one (the ns backend mounts no /sys), it sums
the processes in ``/proc``: inside the sandbox's pid namespace those are exactly the sandbox's
(CPU: utime+stime plus the reaped children's cutime+cstime; memory: RSS). Totals come from
``/proc/meminfo`` and ``statvfs("/")``. CPU use is the average since the previous call (or over
a short sample on the first call).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

_CGROUP_ROOT = Path("/sys/fs/cgroup")
_FIRST_SAMPLE_SECONDS = 0.05


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        return int(text.split()[0])
    except ValueError:
        return None


def _read_keyed(path: Path) -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return values
    for line in lines:
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            values[key] = int(value)
    return values


def _cpu_count() -> int:
    quota = _CGROUP_ROOT / "cpu.max"
    try:
        limit, period = quota.read_text().split()
        if limit != "max":
            return max(1, round(int(limit) / int(period)))
    except (OSError, ValueError):
        pass
    return len(os.sched_getaffinity(0)) or os.cpu_count() or 1


def _cpu_usage_seconds() -> float:
    """Cumulative CPU seconds of this sandbox (cgroup) or of the whole machine (/proc/stat)."""
    stat = _read_keyed(_CGROUP_ROOT / "cpu.stat")
    if "usage_usec" in stat:
        return stat["usage_usec"] / 1e6
    for v1 in ("cpuacct/cpuacct.usage", "cpu,cpuacct/cpuacct.usage"):
        nanos = _read_int(_CGROUP_ROOT / v1)
        if nanos is not None:
            return nanos / 1e9
    return _proc_usage()[0]


def _proc_usage() -> tuple[float, int]:
    """(CPU seconds, RSS bytes) summed over the processes this pid namespace shows."""
    ticks = 0
    pages = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            rss = Path(entry.path, "statm").read_text().split()[1]
        except OSError:
            continue  # exited meanwhile
        fields = stat.rsplit(")", 1)[1].split()
        ticks += sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
        pages += int(rss)
    return ticks / os.sysconf("SC_CLK_TCK"), pages * os.sysconf("SC_PAGE_SIZE")


def _memory() -> tuple[int, int, int]:
    """(total, used, cache) in bytes."""
    meminfo = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        meminfo[key] = int(rest.split()[0]) * 1024
    host_total = meminfo.get("MemTotal", 0)
    used = _read_int(_CGROUP_ROOT / "memory.current")
    if used is not None:
        limit = _read_int(_CGROUP_ROOT / "memory.max") or host_total
        cache = _read_keyed(_CGROUP_ROOT / "memory.stat").get("file", 0)
        return min(limit, host_total), max(used - cache, 0), cache
    used_v1 = _read_int(_CGROUP_ROOT / "memory" / "memory.usage_in_bytes")
    if used_v1 is not None:
        limit = _read_int(_CGROUP_ROOT / "memory" / "memory.limit_in_bytes") or host_total
        cache = _read_keyed(_CGROUP_ROOT / "memory" / "memory.stat").get("total_cache", 0)
        return min(limit, host_total), max(used_v1 - cache, 0), cache
    cache = meminfo.get("Cached", 0) + meminfo.get("Buffers", 0)
    return host_total, min(_proc_usage()[1], host_total), cache


class MetricsSampler:
    def __init__(self) -> None:
        self._last: tuple[float, float] | None = None

    def _cpu_percent(self, cpu_count: int) -> float:
        if self._last is None:
            self._last = (time.monotonic(), _cpu_usage_seconds())
            time.sleep(_FIRST_SAMPLE_SECONDS)
        now, used = time.monotonic(), _cpu_usage_seconds()
        then, used_before = self._last
        self._last = (now, used)
        elapsed = max(now - then, 1e-6)
        return round(max(0.0, min(100.0, (used - used_before) / elapsed / cpu_count * 100)), 2)

    def sample(self) -> dict[str, float | int]:
        cpu_count = _cpu_count()
        mem_total, mem_used, mem_cache = _memory()
        disk = os.statvfs("/")
        disk_total = disk.f_blocks * disk.f_frsize
        return {
            "ts": int(time.time()),
            "cpu_count": cpu_count,
            "cpu_used_pct": self._cpu_percent(cpu_count),
            "mem_total": mem_total,
            "mem_used": mem_used,
            "mem_cache": mem_cache,
            "mem_total_mib": mem_total // (1 << 20),
            "mem_used_mib": mem_used // (1 << 20),
            "disk_total": disk_total,
            "disk_used": disk_total - disk.f_bfree * disk.f_frsize,
        }
