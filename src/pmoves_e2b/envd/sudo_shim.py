#!/usr/bin/python3 -SE
"""``sudo`` for sandboxes (installed as /usr/local/bin/sudo): asks envd to run the command.

no_new_privs keeps the setuid /usr/bin/sudo from working, so this shim sends the request and
its own stdin/stdout/stderr (SCM_RIGHTS) to envd's sudo socket; envd checks the caller's
kernel-verified uid, runs the command on these very fds and answers with its wait status,
which the shim exits with (or dies of). Signals the shim gets are forwarded to the command.
Without envd's socket (a template build, a plain chroot) it execs the real /usr/bin/sudo.

Standalone on purpose: the system python3, no site (-S), no PYTHON* variables (-E), stdlib only.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys

TYPE_CHECKING = False  # typing costs a few ms of every sudo: imported for checkers only
if TYPE_CHECKING:
    from typing import Any, NoReturn

SOCKET_PATH = os.environ.get("PMOVES_SUDO_SOCKET", "/run/pmoves/sudo.sock")
REAL_SUDO = "/usr/bin/sudo"
VERSION = "Sudo version 1.9.13p3 (pmoves-e2b: run by envd, no setuid)"
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGWINCH)
USAGE = """\
usage: sudo -h | -K | -k | -V
usage: sudo -v [-n] [-u user]
usage: sudo -l [-n] [-u user] [command [arg ...]]
usage: sudo [-bEHiknsS] [-D directory] [-u user] [VAR=value] [-i | -s] [command [arg ...]]
"""
# Flags that only matter to a real sudo (prompts, timestamps, SELinux): accepted and ignored.
IGNORED_FLAGS = set("nSAPNB")
IGNORED_WITH_VALUE = set("pCTrt")
LONG_FLAGS = {
    "--non-interactive": "n", "--stdin": "S", "--askpass": "A", "--preserve-groups": "P", "--bell": "B",
    "--set-home": "H", "--login": "i", "--shell": "s", "--reset-timestamp": "k", "--remove-timestamp": "K",
    "--validate": "v", "--list": "l", "--version": "V", "--help": "h", "--preserve-env": "E", "--background": "b",
}  # fmt: skip
LONG_WITH_VALUE = {
    "--user": "u", "--chdir": "D", "--prompt": "p", "--close-from": "C", "--command-timeout": "T",
    "--role": "r", "--type": "t", "--group": "g", "--host": "h", "--other-user": "U",
}  # fmt: skip


class UsageError(Exception):
    pass


def fail(message: str) -> NoReturn:
    sys.stderr.write(f"sudo: {message}\n")
    sys.exit(1)


def parse(args: list[str]) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """sudo's options up to the first non-option (or ``--``), then VAR=value, then the command."""
    opts: dict[str, Any] = {"user": "root", "preserve_env": False, "set_home": False, "login": False, "shell": False,
            "chdir": None, "background": False, "mode": "run"}  # fmt: skip
    position = 0
    while position < len(args):
        arg = args[position]
        if arg == "--":
            position += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        position += 1
        if arg.startswith("--"):
            name, has_value, value = arg.partition("=")
            if name == "--preserve-env" and has_value:
                opts["preserve_env"] = [v for v in value.split(",") if v]
            elif name in LONG_FLAGS and not has_value:
                apply_flag(opts, LONG_FLAGS[name], None)
            elif name in LONG_WITH_VALUE:
                if not has_value:
                    if position >= len(args):
                        raise UsageError(f"option '{name}' requires an argument")
                    value, position = args[position], position + 1
                apply_flag(opts, LONG_WITH_VALUE[name], value)
            else:
                raise UsageError(f"unrecognized option '{arg}'")
            continue
        letters = arg[1:]
        while letters:
            letter, letters = letters[0], letters[1:]
            if letter in "uDgpCTrtU" or (letter == "h" and (letters or position < len(args))):
                value = letters
                if not value:
                    if position >= len(args):
                        raise UsageError(f"option requires an argument -- '{letter}'")
                    value, position = args[position], position + 1
                apply_flag(opts, letter, value)
                break
            apply_flag(opts, letter, None)
    rest = args[position:]
    assign: dict[str, str] = {}
    while rest and "=" in rest[0] and rest[0].split("=", 1)[0].isidentifier():
        name, _, value = rest[0].partition("=")
        assign[name], rest = value, rest[1:]
    return opts, assign, rest


def apply_flag(opts: dict[str, Any], letter: str, value: str | None) -> None:
    if letter in IGNORED_FLAGS or letter in IGNORED_WITH_VALUE:
        return
    simple = {
        "E": ("preserve_env", True),
        "H": ("set_home", True),
        "i": ("login", True),
        "s": ("shell", True),
        "b": ("background", True),
    }
    modes = {"v": "validate", "l": "list", "V": "version", "K": "forget"}
    if letter in simple:
        key, setting = simple[letter]
        opts[key] = setting
    elif letter in modes:
        opts["mode"] = modes[letter]
    elif letter == "h" and value is None:
        opts["mode"] = "help"
    elif letter == "k":
        opts["forget"] = True
    elif letter == "h":  # -h HOST: sudo's remote-host option, meaningless here
        return
    elif letter == "u":
        opts["user"] = value
    elif letter == "D":
        opts["chdir"] = value
    elif letter in "gUe":
        raise UsageError(f"option -{letter} is not supported here")
    else:
        raise UsageError(f"invalid option -- '{letter}'")


def std_fds() -> list[int]:
    """fds 0-2, with /dev/null standing in for closed ones (before the socket can take them)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free number: this very fd
    return [0, 1, 2]


def connect(argv: list[str]) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(SOCKET_PATH)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        if os.path.exists(REAL_SUDO):
            os.execv(REAL_SUDO, argv)  # noqa: S606 - fall back to the real sudo
        fail(f"cannot reach envd's sudo service at {SOCKET_PATH}")
    except OSError as exc:
        fail(f"cannot reach envd's sudo service at {SOCKET_PATH}: {exc.strerror}")
    return sock


def request(sock: socket.socket, body: dict[str, Any], fds: list[int]) -> None:
    payload = json.dumps(body).encode()
    data = struct.pack("!I", len(payload)) + payload
    # who asks, checked by the kernel (envd's gate; this gVisor's SO_PEERCRED names envd itself)
    credentials = struct.pack("3i", os.getpid(), os.geteuid(), os.getegid())
    ancillary = [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, credentials)]
    if fds:
        ancillary.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds)))
    try:
        sent = sock.sendmsg([data], ancillary)
        if sent < len(data):
            sock.sendall(data[sent:])
    except OSError:
        pass  # envd refused early: its reply says why


def read_reply(sock: socket.socket) -> dict[str, Any]:
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            fail("envd closed the connection")
        reply += chunk
    return json.loads(reply)


def forward_signals(sock: socket.socket) -> None:
    def forward(signum: int, _frame: object) -> None:
        try:
            sock.send(bytes([signum]))
        except OSError:
            pass  # envd is answering right now: the command has ended

    for signum in FORWARDED:
        signal.signal(signum, forward)


def exit_like(status: int) -> NoReturn:
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)  # die of the same signal, like sudo
        sys.exit(128 + signum)
    sys.exit(os.waitstatus_to_exitcode(status))


def main(argv: list[str]) -> None:
    try:
        opts, assign, command = parse(argv[1:])
    except UsageError as exc:
        sys.stderr.write(f"sudo: {exc}\n{USAGE}")
        sys.exit(1)
    mode, forget = opts.pop("mode"), opts.pop("forget", False)
    if mode == "version":
        print(VERSION)
        return
    if mode == "help":
        sys.stdout.write(USAGE)
        return
    wants_shell = opts["login"] or opts["shell"]
    if mode == "forget" or (forget and mode == "run" and not command and not wants_shell):
        return  # no timestamps to forget: nobody is ever asked for a password
    if mode == "run" and not command and not wants_shell:
        sys.stderr.write(USAGE)
        sys.exit(1)
    try:
        cwd = os.getcwd()
    except OSError:
        cwd = "/"
    fds = std_fds() if mode == "run" else []
    sock = connect(argv)
    body = {"op": "run" if mode == "run" else "check", "command": command, "cwd": cwd, "env": dict(os.environ),
            "assign": assign, **opts}  # fmt: skip
    request(sock, body, fds)
    if mode == "run":
        forward_signals(sock)
    reply = read_reply(sock)
    if "error" in reply:
        fail(reply["error"])
    if mode == "list":
        import pwd

        name = pwd.getpwuid(os.getuid()).pw_name
        if command:
            print(command[0])
        else:
            print(
                f"User {name} may run the following commands on {socket.gethostname()}:\n    (ALL : ALL) NOPASSWD: ALL"
            )
        return
    if mode == "run":
        exit_like(reply["status"])


if __name__ == "__main__":
    main(sys.argv)
