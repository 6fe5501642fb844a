"""What an image from a registry gets before sandboxes run on it, written without running anything
of the image (it may have no shell, no ``useradd``, no libc): a layer (an overlay upper dir)
holding E2B's ``user`` in the account files, its home and sudo rule, the directories a sandbox mounts on, and
``/bin/bash`` running ``/bin/sh`` when the image has no bash (the SDKs run every command as
``/bin/bash -l -c``). An image without ``/bin/sh`` is refused: commands could not run there.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import TemplateBuildError
from .rootfs import path_in_root

SANDBOX_USER, HOME = "user", "/home/user"
SUDOERS = f"/etc/sudoers.d/{SANDBOX_USER}"
PREFERRED_UID = 1000  # E2B's `user`; taken by another account (node's images: `node`), the next free one
# Directories every sandbox mounts on or expects (Docker's runtime makes them too): mode when missing.
STANDARD_DIRS = {
    "/proc": 0o555,
    "/sys": 0o555,
    "/dev": 0o755,
    "/tmp": 0o1777,  # noqa: S108 - the image's own /tmp
    "/etc": 0o755,
    "/root": 0o700,
    "/home": 0o755,
    "/run": 0o755,
}
BASH_STAND_IN = '#!/bin/sh\nexec /bin/sh "$@"\n'
SETUP_FORMAT = "image-setup-1"  # bumped when the same image gets a different setup layer


def _mkdirs(image: Path, target: Path, path: str) -> Path:
    """``target``'s copy of the image's directory ``path`` (parents made with the image's modes)."""
    dest = target
    for part in [p for p in path.split("/") if p]:
        dest = dest / part
        if dest.is_dir():
            continue
        lower = path_in_root(image, str(dest.relative_to(target)))
        dest.mkdir()
        if lower.is_dir():
            info = lower.stat()
            os.chown(dest, info.st_uid, info.st_gid)
            dest.chmod(stat.S_IMODE(info.st_mode))
        else:
            dest.chmod(0o755)
    return dest


def _entries(path: Path) -> list[list[str]]:
    if not path.is_file():
        return []
    return [line.split(":") for line in path.read_text(errors="replace").splitlines() if line and ":" in line]


def _write(image: Path, target: Path, path: str, lines: list[str], mode: int) -> None:
    """The image's file ``path`` with ``lines`` appended, in ``target`` (the image's owner and mode kept)."""
    lower = path_in_root(image, path)
    rel = str(lower.relative_to(image))
    dest = _mkdirs(image, target, str(Path(rel).parent)) / Path(rel).name
    old = lower.read_text(errors="replace") if lower.is_file() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    dest.write_text(old + "".join(f"{line}\n" for line in lines))
    if lower.is_file():
        info = lower.stat()
        os.chown(dest, info.st_uid, info.st_gid)
        mode = stat.S_IMODE(info.st_mode)
    dest.chmod(mode)


def set_up_image(image: Path, target: Path) -> list[str]:
    """Fill ``target`` (the new setup layer) for the unpacked image ``image``; returns the log lines."""
    log: list[str] = []
    shell = path_in_root(image, "/bin/sh")
    if not (shell.is_file() and os.access(shell, os.X_OK)):
        raise TemplateBuildError(
            "the image has no /bin/sh: sandbox commands run through a shell (the SDKs send /bin/bash -l -c) "
            "and envd's launcher is a shell script; build on an image with a shell (busybox is enough)"
        )
    for path, mode in STANDARD_DIRS.items():
        if not path_in_root(image, path).exists():
            _mkdirs(image, target, path).chmod(mode)
    login = "/bin/bash"
    if not path_in_root(image, "/bin/bash").exists():
        # a script, not a link: busybox picks its applet by argv[0] and has no `bash`
        bash = _mkdirs(image, target, str(path_in_root(image, "/bin").relative_to(image))) / "bash"
        bash.write_text(BASH_STAND_IN)
        bash.chmod(0o755)
        login = "/bin/sh"
        log.append("the image has no /bin/bash: /bin/bash runs /bin/sh (the SDKs run commands with /bin/bash -l -c)")
    passwd, group = _entries(path_in_root(image, "/etc/passwd")), _entries(path_in_root(image, "/etc/group"))
    users = {e[0]: e for e in passwd if len(e) >= 7}
    lines_passwd, lines_group = [], []
    if "root" not in users:
        lines_passwd.append("root:x:0:0:root:/root:/bin/sh")
        if not any(e[0] == "root" for e in group):
            lines_group.append("root:x:0:")
    if SANDBOX_USER in users:
        uid, gid, home = int(users[SANDBOX_USER][2]), int(users[SANDBOX_USER][3]), users[SANDBOX_USER][5]
        log.append(f"the image has user '{SANDBOX_USER}' (uid {uid}); sandboxes run as it")
    else:
        taken = {int(e[2]) for e in passwd if len(e) >= 3 and e[2].isdigit()}
        taken_gids = {int(e[2]) for e in group if len(e) >= 3 and e[2].isdigit()}
        uid = next(n for n in range(PREFERRED_UID, 60000) if n not in taken)
        named = next((e for e in group if e[0] == SANDBOX_USER and len(e) >= 3 and e[2].isdigit()), None)
        if named is not None:
            gid = int(named[2])
        else:
            gid = uid if uid not in taken_gids else next(n for n in range(PREFERRED_UID, 60000) if n not in taken_gids)
            lines_group.append(f"{SANDBOX_USER}:x:{gid}:")
        home = HOME
        lines_passwd.append(f"{SANDBOX_USER}:x:{uid}:{gid}::{home}:{login}")
        note = "" if uid == PREFERRED_UID else f" (uid {PREFERRED_UID} belongs to another account)"
        log.append(f"added user '{SANDBOX_USER}' (uid {uid}, gid {gid}, home {home}){note}")
    if lines_passwd:
        _write(image, target, "/etc/passwd", lines_passwd, 0o644)
        shadow = path_in_root(image, "/etc/shadow")
        if shadow.is_file():
            _write(image, target, "/etc/shadow", [f"{line.split(':')[0]}:!:::::::" for line in lines_passwd], 0o640)
    if lines_group:
        _write(image, target, "/etc/group", lines_group, 0o644)
        gshadow = path_in_root(image, "/etc/gshadow")
        if gshadow.is_file():
            _write(image, target, "/etc/gshadow", [f"{line.split(':')[0]}:!::" for line in lines_group], 0o640)
    # E2B's user has passwordless sudo (envd's sudo reads this rule; so does the image's own sudo)
    if not path_in_root(image, SUDOERS).exists():
        rule = _mkdirs(image, target, str(path_in_root(image, SUDOERS).parent.relative_to(image))) / SANDBOX_USER
        rule.write_text(f"{SANDBOX_USER} ALL=(ALL:ALL) NOPASSWD: ALL\n")
        rule.chmod(0o440)
    if not path_in_root(image, home).is_dir():
        made = _mkdirs(image, target, str(path_in_root(image, home).relative_to(image)))
        os.chown(made, uid, gid)
        made.chmod(0o755)
    return log
