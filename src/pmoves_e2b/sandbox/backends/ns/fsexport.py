"""A sandbox's file changes as a template layer (filesystem snapshots).

The sandbox's overlay upper dir is already a layer in the form templates use (changed files,
whiteouts for deletions, opaque dirs for replaced ones); only its owners differ: they are host uids
of the sandbox's range (``uid_base + n``), while layers hold the template's own ids (``n``) and are
idmapped into each sandbox. The copy is written by the host's root from a tree the sandbox
controls, so it never follows a link, keeps no sockets or device nodes other than whiteouts, and
drops file capabilities (they name the old sandbox's root).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

from pmoves_e2b.sandbox.backends.base import BackendError

# Extended attributes a layer keeps: overlayfs' own (opaque dirs) and the user's.
_KEPT_XATTRS = ("trusted.overlay.", "user.")
_OVERFLOW_ID = 65534  # an owner outside the sandbox's range (cannot happen, but never maps to root)


def export_upper(upper: Path, dest: Path, uid_base: int, id_range: int) -> int:
    """Copy ``upper`` into the new directory ``dest``; returns the bytes of file data copied."""
    if dest.exists():
        raise BackendError(f"{dest} already exists")

    def shifted(host_id: int) -> int:
        inside = host_id - uid_base
        return inside if 0 <= inside < id_range else _OVERFLOW_ID

    copied = 0
    links: dict[tuple[int, int], Path] = {}
    dirs: list[tuple[Path, Path, os.stat_result]] = []

    def copy_entry(src: Path, dst: Path, st: os.stat_result) -> None:
        nonlocal copied
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            dst.mkdir(mode=0o700)
            dirs.append((src, dst, st))
            for entry in os.scandir(src):
                copy_entry(Path(entry.path), dst / entry.name, entry.stat(follow_symlinks=False))
            return
        if st.st_nlink > 1:
            first = links.get((st.st_dev, st.st_ino))
            if first is not None:
                os.link(first, dst)
                return
            links[(st.st_dev, st.st_ino)] = dst
        if stat.S_ISREG(mode):
            fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                with open(fd, "rb", closefd=False) as reader, open(dst, "xb") as writer:
                    shutil.copyfileobj(reader, writer, 1 << 20)
            finally:
                os.close(fd)
            copied += st.st_size
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(src), dst)
        elif stat.S_ISCHR(mode) and st.st_rdev == 0:  # an overlay whiteout: a deleted file
            os.mknod(dst, stat.S_IFCHR | 0o000, 0)
        elif stat.S_ISFIFO(mode):
            os.mkfifo(dst, 0o600)
        else:  # sockets, real device nodes: nothing a layer may carry
            return
        _finish(src, dst, st)

    def _finish(src: Path, dst: Path, st: os.stat_result) -> None:
        for name in _xattrs(src):
            if name.startswith(_KEPT_XATTRS):
                os.setxattr(dst, name, os.getxattr(src, name, follow_symlinks=False), follow_symlinks=False)
        os.chown(dst, shifted(st.st_uid), shifted(st.st_gid), follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(dst, stat.S_IMODE(st.st_mode))
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)

    dest.parent.mkdir(parents=True, exist_ok=True)
    root = upper.lstat()
    if not stat.S_ISDIR(root.st_mode):
        raise BackendError(f"{upper} is not a directory")
    copy_entry(upper, dest, root)
    for src, dst, st in reversed(dirs):  # after their contents, which would change their times
        _finish(src, dst, st)
    return copied


def _xattrs(path: Path) -> list[str]:
    try:
        return os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return []
        raise
