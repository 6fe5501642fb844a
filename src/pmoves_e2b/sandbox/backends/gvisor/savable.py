"""What lets this runsc checkpoint a sandbox: no TCP socket may sit in an epoll set.

runsc 0.0~20221219 refuses to save a TCP endpoint that has waiters ("endpoint still has waiters
upon save"), and a socket in an epoll set always has one; the failed save ends the sandbox. poll
and select wait only during the call (the save interrupts it), so they are fine. envd is asyncio
(uvloop when present): ``install`` writes a ``.pth`` into the sandbox's upper dir that, only in
the process started with ``ENVD_ENV`` set (envd, which the variable then leaves: its children do
not inherit it), makes asyncio use ``selectors.PollSelector`` and keeps uvloop (libuv's epoll)
away. Other programs are left alone: ``EPOLL_TCP_SCAN`` (run inside by the backend before each
checkpoint) names the processes that hold both an epoll instance and a TCP socket, and the
checkpoint is then refused (e.g. a program's asyncio server on its default epoll selector).

A process may vouch for itself: the code interpreter's server (``interpreter/poll_only.py``) holds
an epoll instance (libzmq's, for its kernels' Unix sockets) and TCP sockets (uvicorn's, on a poll
loop), and writes its start time to ``CLAIM_DIR/<pid>`` while no TCP socket of it is in an epoll set.
``install`` makes that dir (root's: only root inside can vouch), and the scan passes a process whose
claim names its own start time (a pid taken again later has another). Its kernels speak ipc, so a
code interpreter sandbox checkpoints; one whose JavaScript, R or Java kernel runs (TCP) does not.
"""

from __future__ import annotations

from pathlib import Path

ENVD_ENV = "PMOVES_GVISOR_POLL"
CLAIM_DIR = "run/pmoves-poll-only"  # below the sandbox's root
PTH = "usr/local/lib/python3.11/dist-packages/zz_pmoves_gvisor_poll.pth"
# One line: site.py executes .pth lines that start with "import".
PTH_LINE = (
    "import os, sys; exec("
    + repr(
        "import asyncio, importlib.machinery, selectors, types\n"
        "selectors.DefaultSelector = selectors.PollSelector\n"
        "stub = types.ModuleType('uvloop')\n"
        "stub.new_event_loop = asyncio.new_event_loop\n"
        "stub.__spec__ = importlib.machinery.ModuleSpec('uvloop', None)\n"
        "sys.modules['uvloop'] = stub\n"
    )
    + f") if os.environ.pop({ENVD_ENV!r}, None) else None\n"
)
# Prints "pid command" for each process holding an epoll instance and a TCP socket. One pass over
# /proc whose cost does not grow with the sandbox's processes: under ptrace every exec inside costs
# ~6 ms, and the shell loop it was, with several per process, took 645 ms in a sandbox of 46
# processes (this: 89 ms; 49 ms in an idle one). One find lists every process's fds, one awk joins
# them with the TCP sockets' inodes (/proc/net/tcp{,6}); only the processes it names (refused) have
# their cmdline read.
EPOLL_TCP_SCAN = r"""
find /proc/[0-9]*/fd -type l -printf '%h %l\n' 2>/dev/null | awk '
function inodes(file,   line, f) {
  while ((getline line < file) > 0) {
    split(line, f, " ")
    if (f[10] ~ /^[0-9]+$/) tcp_inode[f[10]] = 1
  }
  close(file)
}
BEGIN { inodes("/proc/net/tcp"); inodes("/proc/net/tcp6") }
{
  split($1, p, "/"); pid = p[3]
  if ($2 ~ /eventpoll/) epoll[pid] = 1
  else if ($2 ~ /^socket:\[/ && substr($2, 9, length($2) - 9) in tcp_inode) tcp[pid] = 1
}
END { for (pid in epoll) if (pid in tcp) print pid }' | while read -r pid; do
  claim=$(cat "/CLAIM_DIR/$pid" 2>/dev/null)
  [ -n "$claim" ] && [ "$claim" = "$(sed 's/.*) //' "/proc/$pid/stat" | cut -d' ' -f20)" ] && continue
  echo "$pid $(tr '\0' ' ' < "/proc/$pid/cmdline" | cut -c1-80)"
done
""".replace("CLAIM_DIR", CLAIM_DIR)


def install(upper: Path) -> None:
    """Put the .pth and the claims' dir into a sandbox's upper dir (before it starts)."""
    target = upper / PTH
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(PTH_LINE)
    claims = upper / CLAIM_DIR
    claims.mkdir(parents=True, exist_ok=True)
    claims.chmod(0o755)
