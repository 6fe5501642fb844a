"""On the gvisor tier: a server whose TCP sockets are never in an epoll set, and that says so.

That tier's runsc cannot checkpoint (pause to disk, snapshot with memory, fork) a TCP socket that
sits in an epoll set: the save fails and ends the sandbox. So before each checkpoint the tier scans
the sandbox and refuses when a process holds both an epoll instance and a TCP socket (it cannot
see which sockets the epoll holds). This server holds both: libzmq waits on its kernels' sockets
with epoll, and uvicorn waits on TCP. Where ``CLAIM_DIR`` exists (the tier makes it in each
sandbox: ``sandbox/backends/gvisor/savable.py`` names the same dir), it waits with
``selectors.PollSelector`` instead of epoll or uvloop, its ipykernel kernels speak ipc (Unix
sockets: kernel.py), and while none of its kernels speaks TCP (the JavaScript, R and Java ones
do), it writes its start time to ``CLAIM_DIR/<pid>``, which the scan believes. A claim left by a
process that ended names a start time no later process with its pid has.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import selectors
from pathlib import Path

logger = logging.getLogger(__name__)

CLAIM_DIR = Path("/run/pmoves-poll-only")

_enabled = False
_tcp_kernels = 0


def enable_where_asked() -> bool:
    """Whether this sandbox's tier asks for poll (its ``CLAIM_DIR`` exists); from now on."""
    global _enabled
    _enabled = CLAIM_DIR.is_dir()
    return _enabled


def enabled() -> bool:
    return _enabled


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvicorn's loop factory (``loop="pmoves_e2b.interpreter.poll_only:new_event_loop"``)."""
    return asyncio.SelectorEventLoop(selectors.PollSelector())


def tcp_kernel_starting() -> None:
    """Before a kernel that speaks TCP starts: libzmq's epoll will hold TCP sockets."""
    global _tcp_kernels
    _tcp_kernels += 1
    _withdraw()


def tcp_kernel_ended() -> None:
    """After such a kernel's shutdown (or its failed start): the claim once libzmq has closed its
    TCP sockets too, which its I/O thread does after ``stop_channels`` returned."""
    global _tcp_kernels
    _tcp_kernels = max(0, _tcp_kernels - 1)
    if _tcp_kernels == 0 and _enabled:
        _claim_once_closed(asyncio.get_running_loop(), CLOSE_WAIT_S)


CLOSE_WAIT_S = 30.0  # then the claim waits for the next kernel's end (checkpoints are refused meanwhile)
_LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1 and ::1 as /proc/net/tcp{,6} write them


def _claim_once_closed(loop: asyncio.AbstractEventLoop, left_s: float) -> None:
    if _tcp_kernels:
        return
    if not _holds_loopback_tcp():
        claim()
    elif left_s > 0:
        loop.call_later(0.2, _claim_once_closed, loop, left_s - 0.2)


def _holds_loopback_tcp() -> bool:
    """Whether a TCP socket of this process is on loopback: a kernel's channel (uvicorn's are on
    the sandbox's own address)."""
    loopback: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[1].split(":")[0] in _LOOPBACK or fields[2].split(":")[0] in _LOOPBACK:
                    loopback.add(f"socket:[{fields[9]}]")
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") in loopback:
                return True
    return False


def claim() -> None:
    """Say, where the scan looks, that no TCP socket of this process is in an epoll set."""
    if not _enabled or _tcp_kernels:
        return
    try:
        _claim_file().write_text(_start_time())
    except OSError as exc:  # not root (a custom template's user): its sandbox pauses in memory
        logger.warning("cannot claim a poll-only server in %s (%s): checkpoints will be refused", CLAIM_DIR, exc)


def _withdraw() -> None:
    if _enabled:
        with contextlib.suppress(FileNotFoundError):
            _claim_file().unlink()


def _claim_file() -> Path:
    return CLAIM_DIR / str(os.getpid())


def _start_time() -> str:
    """Field 22 of /proc/self/stat: another process that gets this pid later has another."""
    stat = Path("/proc/self/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[19]
