"""What lets this runsc checkpoint a sandbox: no TCP socket may sit in an epoll set.

runsc 0.0~20221219 refuses to save a TCP endpoint that has waiters ("endpoint still has waiters
upon save"), and a socket in an epoll set always has one; the failed save ends the sandbox. poll
and select wait only during the call (the save interrupts it), so they are fine. envd is asyncio
(uvloop when present): ``install`` writes a ``.pth`` into the sandbox's upper dir that, only in
the process started with ``ENVD_ENV`` set (envd, which the variable then leaves: its children do
not inherit it), makes asyncio use ``selectors.PollSelector`` and keeps uvloop (libuv's epoll)
away. Other programs are left alone: ``EPOLL_TCP_SCAN`` (run inside by the backend before each
checkpoint) names the processes that hold both an epoll instance and a TCP socket, and the
checkpoint is then refused (e.g. the code interpreter: libzmq's TCP sockets are in epoll).
"""

from __future__ import annotations

from pathlib import Path

ENVD_ENV = "PMOVES_GVISOR_POLL"
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
# Prints "pid command" for each process holding an epoll instance and a TCP socket.
EPOLL_TCP_SCAN = r"""
tcp=$(cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | awk 'NR > 1 && $10 != "" { print $10 }' | sort -u)
for dir in /proc/[0-9]*; do
    links=$(ls -l "$dir/fd" 2>/dev/null) || continue
    case "$links" in *eventpoll*) ;; *) continue ;; esac
    for inode in $(printf '%s\n' "$links" | sed -n 's/.*socket:\[\([0-9]*\)\].*/\1/p'); do
        if printf '%s\n' "$tcp" | grep -qx "$inode"; then
            echo "${dir#/proc/} $(tr '\0' ' ' < "$dir/cmdline" | cut -c1-80)"
            break
        fi
    done
done
"""


def install(upper: Path) -> None:
    """Put the .pth into a sandbox's upper dir (before it starts)."""
    target = upper / PTH
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(PTH_LINE)
