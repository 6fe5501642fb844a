"""sudo without setuid: envd (root in the sandbox) runs commands for allowed users.

Sandboxes run with no_new_privs, so the setuid ``/usr/bin/sudo`` cannot gain root. The
template installs a small shim at ``/usr/local/bin/sudo`` (``sudo_shim.py``) that connects to
this server's unix socket and sends its request (argv, cwd, environment, flags) together with
its stdin/stdout/stderr as SCM_RIGHTS file descriptors; the command runs on the caller's real
fds (pipes, files and TTYs alike, nothing relayed). The shim forwards SIGINT/SIGTERM/SIGHUP/
SIGQUIT/SIGWINCH as single bytes; the server answers with one JSON line: the wait status, or an
error.

Who may use it is decided per connection from the kernel-verified credentials of the caller
(SCM_CREDENTIALS with its request, whose pid, uid and gid the kernel refuses to pass unless they are
the sender's own; not SO_PEERCRED, which gVisor's runsc 20221219 answers on an accepted connection
with the listener's own credentials, root, for every caller), never from anything the client says:
root, members of the sudo group (primary or supplementary, per /etc/group), and users or %groups
that sudoers grants ``ALL=(ALL[:ALL]) NOPASSWD: ALL`` (the template's ``user``). That is exactly as strong as
passwordless sudo for those users; root inside stays confined by the user namespace, the
seccomp filter and no_new_privs. The socket itself is mode 0666 because mode bits cannot
express "this group or these sudoers users" and would freeze the policy at start-up.

Sudo semantics kept: the environment is reset (``env_reset``; ``-E`` keeps it), PATH is
Debian's ``secure_path``, HOME/USER/LOGNAME/SHELL/MAIL are the target's, SUDO_USER/UID/GID/
COMMAND are set from the peer credentials, ``VAR=value`` arguments are applied last.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import grp
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from . import unix_sockets
from .spawn import SECURE_PATH, command_argv, watch_exit
from .users import User

SOCKET_ENV = "ENVD_SUDO_SOCKET"  # set by the template's envd launcher; unset = no sudo server
GROUP_ENV = "ENVD_SUDO_GROUP"
DEFAULT_GROUP = "sudo"
SUDOERS_FILES = ("/etc/sudoers", "/etc/sudoers.d/*")
# Debian's env_keep plus sudo's built-in list (USER/LOGNAME/SHELL/MAIL/HOME are set afterwards).
ENV_KEEP = frozenset({
    "COLORS", "DISPLAY", "HOSTNAME", "KRB5CCNAME", "LS_COLORS", "PS1", "PS2", "XAUTHORITY",
    "XAUTHORIZATION", "XDG_CURRENT_DESKTOP", "TZ", "TERM", "LANG", "LANGUAGE", "LINGUAS", "COLORTERM",
})  # fmt: skip
ENV_KEEP_PREFIXES = ("LC_",)
HEADER = struct.Struct("!I")
MAX_REQUEST_BYTES = 8 << 20
REQUEST_TIMEOUT = 10.0
STD_FDS = 3
CONTROL_BYTES = socket.CMSG_SPACE(STD_FDS * 4) + unix_sockets.CREDENTIALS_SPACE
FORWARDED_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGWINCH})
SUDOERS_GRANT = re.compile(r"^(%?[\w.-]+)\s+ALL\s*=\s*\(\s*ALL\s*(?::\s*ALL\s*)?\)\s*NOPASSWD\s*:\s*ALL\s*$")


class SudoError(Exception):
    """A refusal the shim prints as ``sudo: <message>`` and exits 1 with."""


@dataclass(frozen=True)
class Request:
    op: str  # "run" or "check" (-v / -l)
    user: str
    command: list[str]
    cwd: str
    env: dict[str, str]
    preserve_env: bool | list[str]
    set_home: bool
    login: bool
    shell: bool
    chdir: str | None
    assign: dict[str, str]
    background: bool

    @classmethod
    def parse(cls, raw: bytes) -> Request:
        try:
            body = json.loads(raw)
            request = cls(
                op=body["op"], user=body["user"], command=body["command"], cwd=body["cwd"], env=body["env"],
                preserve_env=body["preserve_env"], set_home=body["set_home"], login=body["login"],
                shell=body["shell"], chdir=body["chdir"], assign=body["assign"], background=body["background"],
            )  # fmt: skip
        except (ValueError, TypeError, KeyError) as exc:
            raise SudoError("malformed request from the sudo shim") from exc
        if not request._well_typed():
            raise SudoError("malformed request from the sudo shim")
        return request

    def _well_typed(self) -> bool:
        def strings(values: Any) -> bool:
            return isinstance(values, list) and all(isinstance(v, str) for v in values)

        def mapping(values: Any) -> bool:
            return isinstance(values, dict) and all(isinstance(v, str) for v in values.values())

        return (
            self.op in ("run", "check")
            and isinstance(self.user, str)
            and strings(self.command)
            and isinstance(self.cwd, str)
            and mapping(self.env)
            and mapping(self.assign)
            and (isinstance(self.preserve_env, bool) or strings(self.preserve_env))
            and all(isinstance(flag, bool) for flag in (self.set_home, self.login, self.shell, self.background))
            and (self.chdir is None or isinstance(self.chdir, str))
        )


# ---- policy -------------------------------------------------------------------------------


def sudoers_grants(paths: tuple[str, ...] = SUDOERS_FILES) -> set[str]:
    """Users and ``%groups`` that sudoers lets run everything without a password.

    Only that exact rule shape counts; anything narrower (or needing a password) is ignored.
    Like sudo's ``@includedir``, files whose names contain a dot or end in ``~`` are skipped.
    """
    grants: set[str] = set()
    for pattern in paths:
        for path in sorted(glob.glob(pattern)):
            name = os.path.basename(path)
            if pattern.endswith("*") and ("." in name or name.endswith("~")):
                continue
            with contextlib.suppress(OSError, UnicodeDecodeError), open(path, encoding="utf-8") as file:
                for line in file:
                    match = SUDOERS_GRANT.match(line.strip())
                    if match:
                        grants.add(match.group(1))
    return grants


def _in_group(entry: pwd.struct_passwd, group_name: str) -> bool:
    try:
        group = grp.getgrnam(group_name)
    except KeyError:
        return False
    return entry.pw_gid == group.gr_gid or entry.pw_name in group.gr_mem


def may_sudo(uid: int, sudo_group: str, sudoers: tuple[str, ...] = SUDOERS_FILES) -> bool:
    if uid == 0:
        return True
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return False
    if _in_group(entry, sudo_group):
        return True
    grants = sudoers_grants(sudoers)
    return entry.pw_name in grants or any(grant.startswith("%") and _in_group(entry, grant[1:]) for grant in grants)


def _target(user: str) -> pwd.struct_passwd:
    try:
        if user.startswith("#") and user[1:].isdigit():
            return pwd.getpwuid(int(user[1:]))
        return pwd.getpwnam(user)
    except (KeyError, ValueError) as exc:
        raise SudoError(f"unknown user {user}") from exc


# ---- the command --------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    argv: list[str]
    env: dict[str, str]
    cwd: str
    target: pwd.struct_passwd


def build_command(request: Request, caller: pwd.struct_passwd) -> Command:
    target = _target(request.user)
    if request.login or request.shell:
        shell = target.pw_shell if request.login else request.env.get("SHELL") or caller.pw_shell
        shell = shell or "/bin/sh"
        argv = [shell, "-l"] if request.login else [shell]
        if request.command:
            argv += ["-c", shlex.join(request.command)]
    elif request.command:
        argv = [_resolve(request.command[0], request.env.get("PATH", ""), request.cwd), *request.command[1:]]
    else:
        raise SudoError("no command given")
    env = _command_env(request, caller, target, " ".join(argv))
    cwd = request.chdir or (target.pw_dir if request.login else request.cwd)
    if not os.path.isabs(cwd):
        cwd = os.path.join(request.cwd, cwd)
    if request.chdir and not os.path.isdir(cwd):
        raise SudoError(f"unable to change directory to {cwd}: No such file or directory")
    if not os.path.isdir(cwd):  # a vanished cwd (or -i with no home): like sudo, run anyway
        cwd = "/"
    return Command(argv, env, cwd, target)


def _resolve(name: str, caller_path: str, cwd: str) -> str:
    """Like sudo: look in secure_path; unlike it, then in the caller's PATH too (so that
    ``sudo pip`` finds the pip the caller runs, e.g. a venv's)."""
    if "/" in name:
        path = os.path.join(cwd, name)  # name itself when absolute
        if os.path.exists(path):
            return path
    else:
        # Relative PATH entries would resolve against envd's cwd, not the caller's: skipped.
        caller_dirs = os.pathsep.join(entry for entry in caller_path.split(os.pathsep) if os.path.isabs(entry))
        for search in (SECURE_PATH, caller_dirs):
            found = shutil.which(name, path=search) if search else None
            if found:
                return found
    raise SudoError(f"{name}: command not found")


def _command_env(
    request: Request, caller: pwd.struct_passwd, target: pwd.struct_passwd, command: str
) -> dict[str, str]:
    if request.preserve_env is True:
        env = dict(request.env)
    else:
        keep = set(request.preserve_env or ())
        env = {
            name: value
            for name, value in request.env.items()
            if name in ENV_KEEP or name in keep or name.startswith(ENV_KEEP_PREFIXES)
        }
    if request.preserve_env is not True or request.set_home or request.login or "HOME" not in env:
        env["HOME"] = target.pw_dir
    if request.preserve_env is not True or request.login or "SHELL" not in env:
        env["SHELL"] = target.pw_shell or "/bin/sh"
    env.update({
        "PATH": SECURE_PATH,
        "USER": target.pw_name,
        "LOGNAME": target.pw_name,
        "MAIL": f"/var/mail/{target.pw_name}",
        "SUDO_USER": caller.pw_name,
        "SUDO_UID": str(caller.pw_uid),
        "SUDO_GID": str(caller.pw_gid),
        "SUDO_COMMAND": command,
    })  # fmt: skip
    env.update(request.assign)
    return env


def _spawn(command: Command, fds: list[int]) -> subprocess.Popen[bytes]:
    target = command.target
    argv, credentials = command_argv(command.argv, User(target.pw_name, target.pw_uid, target.pw_gid, target.pw_dir))
    try:
        return subprocess.Popen(
            argv,
            stdin=fds[0],
            stdout=fds[1],
            stderr=fds[2],
            cwd=command.cwd,
            env=command.env,
            # Own session and process group: forwarded signals reach the whole job, and a
            # `kill 0` in the command cannot reach envd.
            start_new_session=True,
            **credentials,
        )
    except OSError as exc:
        raise SudoError(f"unable to execute {command.argv[0]}: {exc.strerror}") from exc


# ---- the server ---------------------------------------------------------------------------


class SudoServer:
    """The unix socket on envd's event loop, one task per connection."""

    def __init__(self, path: str, sudo_group: str = DEFAULT_GROUP) -> None:
        self.path = path
        self.sudo_group = sudo_group
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[None]] = set()
        self._children: set[subprocess.Popen[bytes]] = set()
        self._sock = unix_sockets.listen(path, socket.SOCK_STREAM, 64)
        self._loop.add_reader(self._sock.fileno(), self._accept)

    def close(self) -> None:
        self._loop.remove_reader(self._sock.fileno())
        unix_sockets.close(self._sock, self.path)
        for child in list(self._children):
            _kill_group(child, signal.SIGKILL)
        for task in list(self._tasks):
            task.cancel()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # EMFILE and friends: leave it for the next wake-up
                return
            task = self._loop.create_task(self._serve(unix_sockets.accepted(conn)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                reply = await self._handle(conn)
            except SudoError as exc:
                reply = {"error": str(exc)}
            except Exception as exc:  # noqa: BLE001 - the shim must get an answer, not a hang up
                reply = {"error": f"envd could not run the command: {exc!r}"}
            with contextlib.suppress(OSError):
                await self._loop.sock_sendall(conn, json.dumps(reply).encode() + b"\n")

    async def _handle(self, conn: socket.socket) -> dict[str, Any]:
        fds: list[int] = []
        uids: list[int] = []
        try:
            try:
                raw = await asyncio.wait_for(self._receive(conn, fds, uids), REQUEST_TIMEOUT)
            except TimeoutError as exc:
                raise SudoError("timed out reading the request") from exc
            if not uids:
                raise SudoError("the sudo shim must pass its credentials")
            uid = uids[0]
            if not may_sudo(uid, self.sudo_group):
                raise SudoError(f"{_name(uid)} is not in the sudoers file")
            request = Request.parse(raw)
            if request.op == "check":
                return {"ok": True}
            if len(fds) != STD_FDS:
                raise SudoError("the sudo shim must pass stdin, stdout and stderr")
            child = _spawn(build_command(request, pwd.getpwuid(uid)), fds)
        finally:
            for fd in fds:
                os.close(fd)
        if request.background:  # -b: like sudo, answer at once; the exit is reaped unattended
            self._children.add(child)
            self._exit_future(child).add_done_callback(lambda _: self._children.discard(child))
            return {"status": 0}
        return {"status": await self._supervise(conn, child)}

    async def _receive(self, conn: socket.socket, fds: list[int], uids: list[int]) -> bytes:
        """One request: a 4-byte length, then JSON; the fds and the sender's credentials (its uid
        into ``uids``) arrive with the first bytes. Reads exactly that much: forwarded signal bytes
        may follow right behind."""
        data = bytearray()
        wanted = HEADER.size
        while len(data) < wanted:
            chunk, ancillary = await self._recvmsg(conn, min(wanted - len(data), 1 << 16))
            fds += unix_sockets.received_fds(ancillary)
            if (credentials := unix_sockets.sender(ancillary)) is not None:
                uids.append(credentials[1])
            if not chunk:
                raise SudoError("connection closed inside the request")
            data += chunk
            if wanted == HEADER.size and len(data) == HEADER.size:
                (length,) = HEADER.unpack_from(data)
                if length > MAX_REQUEST_BYTES:
                    raise SudoError("request too large")
                wanted += length
        return bytes(data[HEADER.size :])

    async def _recvmsg(self, conn: socket.socket, size: int) -> tuple[bytes, list[tuple[int, int, bytes]]]:
        while True:
            try:
                chunk, ancillary, _, _ = conn.recvmsg(size, CONTROL_BYTES)
                return chunk, ancillary
            except (BlockingIOError, InterruptedError):
                await self._readable(conn.fileno())

    async def _readable(self, fd: int) -> None:
        ready: asyncio.Future[None] = self._loop.create_future()
        self._loop.add_reader(fd, lambda: None if ready.done() else ready.set_result(None))
        try:
            await ready
        finally:
            self._loop.remove_reader(fd)

    async def _supervise(self, conn: socket.socket, child: subprocess.Popen[bytes]) -> int:
        """Relay forwarded signals to the command's process group until it exits; if the
        shim goes away first (killed), the command is killed too, as nobody waits for it."""
        self._children.add(child)
        try:
            exited = self._exit_future(child)
            while not exited.done():
                reading = self._loop.create_task(self._loop.sock_recv(conn, 64))
                waiting: set[asyncio.Future[Any]] = {exited, reading}
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if not reading.done():
                    reading.cancel()
                    break
                try:
                    signals = reading.result()
                except OSError:
                    signals = b""
                if not signals:
                    _kill_group(child, signal.SIGKILL)
                    break
                for number in signals:
                    if number in FORWARDED_SIGNALS:
                        _kill_group(child, number)
            return await exited
        finally:
            self._children.discard(child)

    def _exit_future(self, child: subprocess.Popen[bytes]) -> asyncio.Future[int]:
        """The wait status, once the command exits."""
        done: asyncio.Future[int] = self._loop.create_future()
        watch_exit(self._loop, child, done.set_result)
        return done


def _kill_group(child: subprocess.Popen[bytes], sig: int) -> None:
    if child.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, sig)


def _name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"#{uid}"


def start_sudo_server() -> SudoServer | None:
    """Serve sudo when the launcher asks for it (``ENVD_SUDO_SOCKET``) and envd is root."""
    path = os.environ.get(SOCKET_ENV)
    if not path or os.geteuid() != 0:
        return None
    try:
        return SudoServer(path, os.environ.get(GROUP_ENV) or DEFAULT_GROUP)
    except OSError as exc:  # envd still serves everything else; sudo then falls back to /usr/bin/sudo
        print(f"envd: cannot serve sudo on {path}: {exc}", file=sys.stderr)
        return None
