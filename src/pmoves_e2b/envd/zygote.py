"""envd's zygote: one pre-imported envd per template, forked into each new sandbox.

Started by the host (``ENVD_ZYGOTE=<fd>``, see the ns backend's ``zygote.py``) as host root on a
read-only view of the template's envd and os layers alone, so every path it imported from is the
same path inside a sandbox. It imports envd, uvicorn and the protocol classes and makes uvicorn's
config once (with its collector off, then frozen: a child copies only the pages it writes), then serves
one request per sandbox on the unix socket ``fd``: a message whose SCM_RIGHTS fds are

    pidfd of the sandbox's pid 1, its netns, its four ``cgroup.procs``, envd's log, the write end
    of the launcher's "alive" pipe, and a pipe holding the sandbox's config (JSON)

and answers one status byte. The config (the env with ``ENVD_INIT_SECRET``, uid, limits) is read
only after the fork, so no sandbox's secret ever sits in the zygote's memory, which every later
sandbox inherits. The fork is made in the sandbox's pid namespace (the zygote's children's for
that one fork); the child (``_enter``), in order: joins the sandbox's cgroups and netns (host root),
lowers rlimits, drops to the sandbox's host uid, ``setns``es into its user, mount, pid, ipc, uts and
cgroup namespaces through the pidfd (the owner of that user namespace may), takes the capabilities,
no_new_privs and seccomp filter bwrap gave the launcher, then forks envd and exits, so envd is a
child of the sandbox's own init. envd writes a line on the alive pipe when it runs; the launcher restarts
it cold when the pipe ends (and starts one cold when no line came: the zygote failed).
The zygote is single-threaded: a process with threads cannot join a user namespace.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import random
import resource
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Callable

CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x02000000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
PR_SET_DUMPABLE, PR_CAPBSET_READ, PR_CAPBSET_DROP, PR_SET_SECCOMP = 4, 23, 24, 22
PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE = 38, 47, 2
SECCOMP_MODE_FILTER = 2
CAPABILITY_VERSION_3 = 0x20080522
FDS_PER_REQUEST = 9  # pidfd, netns, 4 x cgroup.procs, log, alive, config

_libc = ctypes.CDLL(None, use_errno=True)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _check(result: int, what: str) -> None:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _prctl(option: int, arg2: int = 0, arg3: int = 0) -> int:
    return int(_libc.prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), ctypes.c_ulong(0), ctypes.c_ulong(0)))


def _set_capabilities(mask: int) -> None:
    """What bwrap leaves root inside: bounding, permitted, effective, inheritable and ambient = mask."""
    cap = 0
    while _prctl(PR_CAPBSET_READ, cap) >= 0:
        if not mask >> cap & 1:
            _check(_prctl(PR_CAPBSET_DROP, cap), f"drop capability {cap}")
        cap += 1
    data = (_CapData * 2)()
    for i in range(2):
        word = (mask >> (32 * i)) & 0xFFFFFFFF
        data[i].effective = data[i].permitted = data[i].inheritable = word
    _check(_libc.capset(ctypes.byref(_CapHeader(CAPABILITY_VERSION_3, 0)), data), "capset")
    for cap in range(64):
        if mask >> cap & 1:
            _check(_prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap), f"raise ambient capability {cap}")


def _load_seccomp(program: bytes) -> None:
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    _check(_prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog)), "seccomp")


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _enter(fds: list[int], seccomp: bytes, run_envd: Callable[[], None]) -> None:
    """In the forked child: become this sandbox's envd (never returns)."""
    pidfd, netns, *procs = fds[:6]
    log, alive, config_fd = fds[6:9]
    config = json.loads(_read_all(config_fd))
    for fd in procs:
        os.write(fd, str(os.getpid()).encode())
    _check(_libc.setns(netns, CLONE_NEWNET), "setns net")
    for name, value in config["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    uid = int(config["uid"])
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)  # no capability left on the host
    namespaces = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP
    _check(_libc.setns(pidfd, namespaces), "setns into the sandbox")
    os.chdir("/")
    for fd in (0, 1, 2):
        os.dup2(log if fd else os.open("/dev/null", os.O_RDONLY), fd)
    os.set_inheritable(alive, False)
    os.closerange(3, alive)  # every fd but 0-2 and the alive pipe (the request's others are dup'ed or used)
    os.closerange(alive + 1, 1 << 20)
    _set_capabilities(int(config["capabilities"]))
    _check(_prctl(PR_SET_NO_NEW_PRIVS, 1), "no_new_privs")
    _load_seccomp(seccomp)
    _check(_prctl(PR_SET_DUMPABLE, 1), "dumpable")  # as an envd bwrap started: /proc/<envd> is root's inside
    if os.fork():  # envd's parent exits: the sandbox's init adopts it, as it adopts everything there
        os._exit(0)
    os.setsid()
    os.environ.update(config["env"])  # over the launcher's exports, which the zygote has too
    random.seed()
    os.write(alive, b"\n")
    run_envd()
    raise SystemExit(0)


def serve(sock_fd: int, prepare: Callable[[], Callable[[], None]]) -> None:
    """The zygote's loop: one fork per request, until the host closes the socket. ``prepare`` runs
    once before the first (imports, uvicorn's config) and returns what a fork runs as envd."""
    sock = socket.socket(fileno=sock_fd)
    seccomp = _read_all(int(os.environ.pop("ENVD_ZYGOTE_SECCOMP_FD")))
    gc.disable()  # no collection while it imports: they would only be undone by the freeze below
    run_envd = prepare()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    gc.collect()
    gc.freeze()  # imported objects move out of the collector's reach: fewer pages copied per child
    gc.enable()
    own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    sock.sendall(b"r")
    while True:
        if threading.active_count() != 1:
            raise RuntimeError("the envd zygote has threads: it could not join user namespaces")
        try:
            _, fds, _, _ = socket.recv_fds(sock, 1, FDS_PER_REQUEST)
        except ConnectionError:
            return
        if not fds:
            return  # the host closed the socket
        status = b"e"
        try:
            if len(fds) != FDS_PER_REQUEST:
                raise ValueError(f"expected {FDS_PER_REQUEST} fds, got {len(fds)}")
            child = _fork_into_pid_namespace(fds[0], own_pid_ns)
            if child == 0:
                code = 1
                try:
                    _enter(fds, seccomp, run_envd)
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else 1
                except BaseException:  # noqa: BLE001 - this process ends here either way
                    traceback.print_exc()
                finally:
                    os._exit(code)
            _, wait_status = os.waitpid(child, 0)
            status = b"o" if os.waitstatus_to_exitcode(wait_status) == 0 else b"f"
        except Exception:  # noqa: BLE001 - reported to the host; the launcher starts envd cold
            traceback.print_exc(file=sys.stderr)
        finally:
            for fd in fds:
                os.close(fd)
        sock.sendall(status)


def _fork_into_pid_namespace(pidfd: int, own_pid_ns: int) -> int:
    """fork(), the child already in the sandbox's pid namespace, so that it needs one fork more
    (not two) for envd to be adopted by the sandbox's init: a fork copies the zygote's page tables
    and its exit tears them down, CPU per sandbox. Nothing but the launcher runs in a sandbox yet."""
    _check(_libc.setns(pidfd, CLONE_NEWPID), "setns pid for children")
    child = -1
    try:
        child = os.fork()
    finally:
        if child != 0:  # the zygote's own later children are its own namespace's again
            _check(_libc.setns(own_pid_ns, CLONE_NEWPID), "setns back to the zygote's pid namespace")
    return child
