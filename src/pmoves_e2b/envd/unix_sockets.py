"""envd's Unix sockets for the sandbox's programs (sudo, xattrs): open to every user (mode 0666),
each request judged by the credentials the kernel passes with it (SCM_CREDENTIALS: it refuses to
pass a pid, uid or gid that is not the sender's own, CAP_SYS_ADMIN, CAP_SETUID and CAP_SETGID
aside). Never by SO_PEERCRED: this gVisor (runsc 20221219) answers it, on an accepted connection,
with the listener's own credentials (envd's, root) whoever the caller is."""

from __future__ import annotations

import array
import contextlib
import os
import socket
import struct

UCRED = struct.Struct("3i")  # pid, uid, gid
CREDENTIALS_SPACE = socket.CMSG_SPACE(UCRED.size)

Ancillary = list[tuple[int, int, bytes]]


def listen(path: str, kind: int, backlog: int) -> socket.socket:
    """A non-blocking listener at ``path`` (one an earlier envd left is replaced) whose connections
    receive their callers' credentials."""
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.bind(path)
    os.chmod(path, 0o666)  # noqa: S103 - the gate is each request's credentials (module docstring)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def accepted(conn: socket.socket) -> socket.socket:
    """A connection ready to be read: non-blocking, passed its caller's credentials."""
    conn.setblocking(False)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # before its request is read
    return conn


def close(sock: socket.socket, path: str) -> None:
    sock.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def sender(ancillary: Ancillary) -> tuple[int, int, int] | None:
    """The sender's pid, uid and gid, as the kernel passed them; None without them."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(data) >= UCRED.size:
            pid, uid, gid = UCRED.unpack_from(data)
            return pid, uid, gid
    return None


def received_fds(ancillary: Ancillary) -> list[int]:
    """The fds of SCM_RIGHTS, now the receiver's to close."""
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(data[: len(data) - len(data) % received.itemsize])
            fds += received
    return fds
