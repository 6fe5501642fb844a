"""Mutable daemon state set by ``POST /init`` (and the environment at start-up).

When the launcher names a state file (``ENVD_STATE_FILE``, under the sandbox's own /dev/shm: memory,
never part of a disk or a template layer), what ``/init`` set is kept there (root only, 0600) so an
envd that the launcher restarts after it died (the sandbox's OOM chose it) serves the same sandbox:
same access token, env vars, default user and workdir.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_TEMPLATE_USER = "user"
STATE_FILE_ENV = "ENVD_STATE_FILE"


def _default_username() -> str:
    configured = os.environ.get("ENVD_DEFAULT_USER")
    if configured:
        return configured
    try:
        pwd.getpwnam(DEFAULT_TEMPLATE_USER)
    except KeyError:
        return "root"
    return DEFAULT_TEMPLATE_USER


@dataclass
class EnvdState:
    """What the host told envd: sandbox env vars, access token, default user and workdir."""

    init_secret: str | None = None
    access_token: str | None = None
    default_user: str = field(default_factory=_default_username)
    default_workdir: str | None = None
    env_vars: dict[str, str] = field(default_factory=dict)
    state_file: Path | None = None  # where /init's settings are kept for a restarted envd
    restored: bool = False  # this envd took over from one that died

    @classmethod
    def from_environment(cls) -> EnvdState:
        state = cls(init_secret=os.environ.get("ENVD_INIT_SECRET") or None)
        configured = os.environ.get(STATE_FILE_ENV)
        if configured and os.geteuid() == 0:
            state.state_file = _private_dir(Path(configured))
            state.restore()
        return state

    def save(self) -> None:
        """Keep /init's settings for a restarted envd (best effort: without it a restart ends the sandbox)."""
        if self.state_file is None:
            return
        data = {
            "accessToken": self.access_token,
            "defaultUser": self.default_user,
            "defaultWorkdir": self.default_workdir,
            "envVars": self.env_vars,
        }
        temporary = self.state_file.with_name(self.state_file.name + ".new")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as out:
                json.dump(data, out)
            os.replace(temporary, self.state_file)
        except OSError as exc:  # e.g. the sandbox filled its /dev/shm: no restart rather than a stale one
            print(f"envd: cannot keep the state for a restart in {self.state_file}: {exc}", file=sys.stderr)
            for stale in (temporary, self.state_file):
                with contextlib.suppress(OSError):
                    stale.unlink()

    def restore(self) -> None:
        if self.state_file is None:
            return
        try:
            fd = os.open(self.state_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return  # the sandbox's first envd
        try:
            with os.fdopen(fd) as source:
                data = json.load(source)
            self.access_token = data["accessToken"]
            self.default_user = data["defaultUser"]
            self.default_workdir = data["defaultWorkdir"]
            self.env_vars = dict(data["envVars"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Never serve without the sandbox's access token: exit, and the sandbox ends with us.
            raise SystemExit(f"envd: unreadable state in {self.state_file} ({exc!r}); not restarting") from exc
        self.restored = True
        print("envd: restarted; serving the sandbox with the state the host gave the envd before", file=sys.stderr)


def _private_dir(path: Path) -> Path | None:
    """``path`` if its directory is (made) a root-only directory; /dev/shm is writable by every
    user, so a directory someone else made there (or a symlink) is refused, not used."""
    try:
        path.parent.mkdir(mode=0o700, exist_ok=True)
        info = path.parent.lstat()
    except OSError as exc:
        print(f"envd: no state directory {path.parent}: {exc}", file=sys.stderr)
        return None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0 or stat.S_IMODE(info.st_mode) & 0o077:
        print(f"envd: {path.parent} is not a root-only directory; a restart will not keep the state", file=sys.stderr)
        return None
    return path
