"""envd's socket for programs' own xattr calls where the file system refuses them (gVisor's root).

The gvisor tier's preload shim connects to it only after the file system answered ENOTSUP (or, for a
listing, after a probe of a ``user.`` name did), sends one SOCK_SEQPACKET message (the request of
program_xattrs.py, the file as one SCM_RIGHTS fd, the caller's SCM_CREDENTIALS) and reads one back: a
native int32, the call's result or -errno, then the bytes for its buffer. One request per connection,
on envd's event loop: envd never opens, reads or follows what it is given (fstat, /proc/self/fd's link
and an lstat of it), so no request can make it block. The socket is 0666 like sudo's: the gate is the
caller's credentials (SCM_CREDENTIALS, see unix_sockets.py), checked per request as Linux checks
them. A connection that sends nothing is closed
after IDLE_S, at most MAX_PENDING wait at once (more are closed at once: the shim then answers the
program's own ENOTSUP). Nothing of a request is logged, not even its name.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import socket
import struct
import sys

from . import XATTR_SOCKET, unix_sockets
from .program_xattrs import HEADER, NAME_MAX, SIZE_MAX, Caller, Request, XattrError, answer

REPLY = struct.Struct("=i")
RECEIVE_BYTES = HEADER.size + NAME_MAX + SIZE_MAX + 1  # the largest request, and a byte to tell more
MAX_FDS = 4  # received (to close them all) though a request has one
CONTROL_BYTES = socket.CMSG_SPACE(MAX_FDS * 4) + unix_sockets.CREDENTIALS_SPACE
MAX_PENDING = 64
IDLE_S = 10.0
PROBE_NAME = "user.pmoves.probe"
IN_ENVD_FLAG = "pmoves_xattr_in_envd"  # the shim's, see _stop_asking_itself


class XattrServer:
    def __init__(self, path: str) -> None:
        self.path = path
        self._loop = asyncio.get_running_loop()
        self._pending: dict[socket.socket, asyncio.TimerHandle] = {}
        self._sock = unix_sockets.listen(path, socket.SOCK_SEQPACKET, MAX_PENDING)
        self._loop.add_reader(self._sock.fileno(), self._accept)

    def close(self) -> None:
        self._loop.remove_reader(self._sock.fileno())
        unix_sockets.close(self._sock, self.path)
        for conn in list(self._pending):
            self._drop(conn)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:  # none left (EAGAIN), or EMFILE and friends: the next wake-up
                return
            if len(self._pending) >= MAX_PENDING:
                conn.close()
                continue
            unix_sockets.accepted(conn)
            self._pending[conn] = self._loop.call_later(IDLE_S, self._drop, conn)
            self._loop.add_reader(conn.fileno(), self._serve, conn)

    def _drop(self, conn: socket.socket) -> None:
        timer = self._pending.pop(conn, None)
        if timer is None:
            return
        timer.cancel()
        self._loop.remove_reader(conn.fileno())
        conn.close()

    def _serve(self, conn: socket.socket) -> None:
        try:
            message, ancillary, flags, _ = conn.recvmsg(RECEIVE_BYTES, CONTROL_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        fds = unix_sockets.received_fds(ancillary)
        try:
            if message or fds:  # else the caller hung up
                result, data = _answered(message, flags, fds, unix_sockets.sender(ancillary))
                with contextlib.suppress(OSError):  # the caller is gone, or its buffer is full: it gets ENOTSUP
                    conn.send(REPLY.pack(result) + data)
        finally:
            for fd in fds:
                os.close(fd)
            self._drop(conn)


def _answered(
    message: bytes, flags: int, fds: list[int], credentials: tuple[int, int, int] | None
) -> tuple[int, bytes]:
    try:
        if flags & socket.MSG_TRUNC:
            raise XattrError(errno.E2BIG)  # more than a 64 KiB value
        if flags & socket.MSG_CTRUNC or len(fds) != 1:
            raise XattrError(errno.EINVAL)
        request = Request.parse(message)
        if credentials is None:
            raise XattrError(errno.EPERM)
        return answer(request, fds[0], Caller.of_peer(*credentials))
    except XattrError as exc:
        return -exc.code, b""
    except OSError as exc:  # the store's own failures (its disk full: ENOSPC), as the call's
        return -(exc.errno or errno.EIO), b""
    except Exception as exc:  # noqa: BLE001 - a bug here is the caller's EIO, never envd's end
        print(f"envd: xattr request failed: {type(exc).__name__}", file=sys.stderr)
        return -errno.EIO, b""


def _stop_asking_itself() -> None:
    """envd's own xattr calls go through the shim too (it is preloaded into every process); asking this
    socket from its own event loop would wait forever, so the shim's flag for envd is set (no shim, as
    on the ns tier or a host: nothing to set)."""
    with contextlib.suppress(ValueError, OSError):
        ctypes.c_int.in_dll(ctypes.CDLL(None), IN_ENVD_FLAG).value = 1


def start_xattr_server() -> XattrServer | None:
    """Serve where envd is root and the root file system refuses user xattrs; elsewhere programs
    have the file system's own."""
    if os.geteuid() != 0:
        return None
    _stop_asking_itself()
    try:
        os.getxattr("/", PROBE_NAME)
    except OSError as exc:
        if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return None
    else:
        return None
    try:
        return XattrServer(XATTR_SOCKET)
    except OSError as exc:  # envd serves the rest; programs keep ENOTSUP
        print(f"envd: cannot serve xattrs on {XATTR_SOCKET}: {exc}", file=sys.stderr)
        return None
