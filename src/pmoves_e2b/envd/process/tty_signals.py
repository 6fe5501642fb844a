"""^C, ^\\ and ^Z typed into a PTY, where the kernel's terminal does not make them signals.

Linux's terminal, with ISIG set, sends SIGINT, SIGQUIT or SIGTSTP to its foreground process group
for the VINTR, VQUIT and VSUSP characters, which the program never reads. The gVisor of Debian 12
(runsc 20221219) has no ISIG (gVisor added it in 2023), so a ^C reached ``sleep`` as a byte it never
read. envd does it for the PTYs it made, only where ``kernel_sends_signals`` finds the kernel does not
(a second signal would reach programs that count them).

The foreground group: this gVisor answers ``tcgetpgrp`` only to the terminal's own session and shows
no tpgid in /proc, so gVisor's preload shim (sandbox/backends/gvisor/shim.py) writes the group that a
shell's ``tcsetpgrp`` made foreground to ``FOREGROUND_FILE`` (mode 0600, as the shell's user). envd
believes it when that user owns it and the group is in the session; else the session leader's own
group (the shell at its prompt) is the foreground.
"""

from __future__ import annotations

import contextlib
import functools
import os
import select
import signal
import termios
import time

FOREGROUND_FILE = "/dev/shm/.pmoves-tty-foreground-{sid}"  # noqa: S108 (O_NOFOLLOW, owner checked)
_SIGNALS = ((termios.VINTR, signal.SIGINT), (termios.VQUIT, signal.SIGQUIT), (termios.VSUSP, signal.SIGTSTP))


@functools.cache
def kernel_sends_signals() -> bool:
    """Whether a ^C written to a PTY master is taken by the kernel (Linux) or read as a byte."""
    master, slave = os.openpty()
    try:
        attrs = termios.tcgetattr(slave)
        attrs[3] = (attrs[3] | termios.ISIG) & ~(termios.ICANON | termios.ECHO)
        attrs[6][termios.VMIN], attrs[6][termios.VTIME] = 0, 0
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        os.write(master, attrs[6][termios.VINTR] + b".")  # the dot: the write has arrived
        read = b""
        deadline = time.monotonic() + 2
        while b"." not in read and time.monotonic() < deadline:
            if select.select([slave], [], [], 0.1)[0]:
                read += os.read(slave, 64)
        return attrs[6][termios.VINTR] not in read
    finally:
        os.close(master)
        os.close(slave)


def split(master: int, data: bytes) -> list[bytes | signal.Signals]:
    """``data`` as the bytes the terminal passes on and the signals its control characters make (in
    order), as the terminal's ISIG setting says; all bytes where the kernel makes the signals."""
    if kernel_sends_signals():
        return [data]
    try:
        attrs = termios.tcgetattr(master)
    except termios.error:
        return [data]
    if not attrs[3] & termios.ISIG:
        return [data]
    chars = {attrs[6][index]: sig for index, sig in _SIGNALS if attrs[6][index] not in (b"\0", 0)}
    parts: list[bytes | signal.Signals] = []
    start = 0
    for at, byte in enumerate(data):
        sig = chars.get(bytes([byte]))
        if sig is not None:
            parts += [data[start:at], sig] if at > start else [sig]
            start = at + 1
    if start < len(data):
        parts.append(data[start:])
    return parts


def send(sid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to the foreground process group of the terminal of session ``sid``."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(_foreground(sid), sig)


def forget(sid: int) -> None:
    """The session ended: its foreground record goes."""
    with contextlib.suppress(OSError):
        os.unlink(FOREGROUND_FILE.format(sid=sid))


def _foreground(sid: int) -> int:
    try:
        fd = os.open(FOREGROUND_FILE.format(sid=sid), os.O_RDONLY | os.O_NOFOLLOW)
        try:
            owner = os.fstat(fd).st_uid
            group = int(os.read(fd, 32).strip() or b"0")
        finally:
            os.close(fd)
        if owner == os.stat(f"/proc/{sid}").st_uid and group > 0 and _session_of(group) == sid:
            return group
    except (OSError, ValueError):
        pass
    return sid


def _session_of(pgrp: int) -> int | None:
    """The session of the process group ``pgrp`` (its leader's), None if it has none now."""
    try:
        with open(f"/proc/{pgrp}/stat", "rb") as stat_file:
            fields = stat_file.read().rpartition(b")")[2].split()
    except OSError:
        return None
    return int(fields[3]) if int(fields[2]) == pgrp else None
