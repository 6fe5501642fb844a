"""Users and paths: who a request runs as, and how its paths resolve (like E2B's envd)."""

from __future__ import annotations

import base64
import binascii
import os
import pwd
from dataclasses import dataclass


class UnknownUserError(LookupError):
    """The requested user does not exist in this sandbox."""


class InvalidPathError(ValueError):
    """A path that cannot be resolved (e.g. ``~other/...``)."""


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: str

    def groups(self) -> list[int]:
        return os.getgrouplist(self.name, self.gid)

    def is_current(self) -> bool:
        """True when envd already runs as this user (then no credential switch is needed)."""
        return self.uid == os.geteuid() and self.gid == os.getegid()


def lookup_user(name: str) -> User:
    try:
        entry = pwd.getpwnam(name)
    except (KeyError, ValueError) as exc:
        raise UnknownUserError(f"invalid username: '{name}'") from exc
    return User(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)


def username_from_basic_auth(header: str | None) -> str | None:
    """The user of ``Authorization: Basic base64("<user>:")``, or None without the header."""
    if not header:
        return None
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        raise UnknownUserError("unsupported authorization scheme")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise UnknownUserError("malformed basic authorization header") from exc
    return decoded.partition(":")[0]


def resolve_path(path: str, user: User, default_workdir: str | None = None) -> str:
    """Absolute, normalised path: empty → default workdir, ``~`` → home, relative → under home."""
    if "\x00" in path:
        raise InvalidPathError("path contains a NUL byte")
    if not path and default_workdir:
        path = default_workdir
    if path.startswith("~"):
        if len(path) > 1 and path[1] != "/":
            raise InvalidPathError(f"cannot expand user-specific home dir in '{path}'")
        path = os.path.join(user.home, path[1:].lstrip("/"))
    if not os.path.isabs(path):
        path = os.path.join(user.home, path)
    return os.path.normpath(path)


def ensure_dirs(path: str, user: User) -> None:
    """``mkdir -p`` that chowns every directory it creates to ``user``."""
    missing: list[str] = []
    current = path
    while not os.path.lexists(current):
        missing.append(current)
        current = os.path.dirname(current)
    if not os.path.isdir(current):
        raise NotADirectoryError(f"path is a file: {current}")
    for directory in reversed(missing):
        os.mkdir(directory, 0o755)
        chown_to(directory, user)


def chown_to(path: str, user: User) -> None:
    if not user.is_current():
        os.chown(path, user.uid, user.gid, follow_symlinks=False)
