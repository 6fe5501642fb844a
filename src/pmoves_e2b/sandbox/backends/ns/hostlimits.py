"""Host-wide kernel tables that every sandbox shares (issue 11: one sandbox filled fs.file-nr).

A sandbox's share of each table must be bounded by something the sandbox owns, never by a global
table the first sandbox can fill:

- open files: ``struct file`` is charged to the opener's memory cgroup (checked on this kernel: a
  48 MiB group OOMs at about 170,000 open files), so the sandbox's memory limit bounds its files.
  ``fs.file-max`` is lifted out of reach, as systemd does.
- pids: each sandbox has ``pids.max``; the parent group of all sandboxes is capped at
  ``pid_max - HOST_PID_RESERVE`` (``cgroups.cap_parent_pids``), and ``kernel.pid_max`` is lifted to
  the 64-bit limit as systemd does, so 40 sandboxes x 1,024 pids no longer exceed it.
- PTYs: each sandbox has its own devpts instance with ``max=PTYS_PER_SANDBOX`` (ns backend);
  ``kernel.pty.max`` is lifted so that the instances never meet the global count.
- inotify instances and watches are counted per host uid, and each sandbox has its own uid range.

Only raising, never lowering: another tenant of the host may have set higher values.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

PTYS_PER_SANDBOX = 256
HOST_PID_RESERVE = 8192
FILE_MAX = 2**63 - 1  # LONG_MAX, what systemd writes
PID_MAX = 4_194_304  # PID_MAX_LIMIT on 64-bit
PTY_MAX = 1 << 20  # NR_UNIX98_PTY_MAX
SYSCTLS = {"fs/file-max": FILE_MAX, "kernel/pid_max": PID_MAX, "kernel/pty/max": PTY_MAX}
PROC_SYS = Path("/proc/sys")


def lift_global_tables() -> None:
    """Raise the global caps out of reach; a host where /proc/sys is read-only keeps its own."""
    for key, value in SYSCTLS.items():
        path = PROC_SYS / key
        try:
            if int(path.read_text()) < value:
                path.write_text(str(value))
        except OSError as exc:
            log.warning("cannot raise %s to %d (%s): sandboxes share the host's smaller table", key, value, exc)


def pid_max() -> int:
    return int((PROC_SYS / "kernel/pid_max").read_text())


def sandboxes_pids_max() -> int:
    """What all sandboxes of one backend may hold together: pid_max less the host's reserve."""
    return max(1, pid_max() - HOST_PID_RESERVE)
