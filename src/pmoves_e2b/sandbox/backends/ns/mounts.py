"""Mounts of the ns backend through libc (mount, umount2, open_tree + mount_setattr for idmapped
layers) and the sandbox's disk (a sparse ext4 image on a loop device)."""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import subprocess
from pathlib import Path

from pmoves_e2b.sandbox.backends.base import BackendError

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_SHARED = 0x2, 0x4, 0x8, 0x1000, 1 << 20
MNT_DETACH = 0x2
SYS_OPEN_TREE, SYS_MOUNT_SETATTR = 428, 442
AT_FDCWD, AT_EMPTY_PATH = -100, 0x1000
OPEN_TREE_CLONE, OPEN_TREE_CLOEXEC = 1, os.O_CLOEXEC
MOUNT_ATTR_IDMAP = 0x100000
LOOP_CONTROL = Path("/dev/loop-control")
MKFS_EXT4 = "/sbin/mkfs.ext4"


def check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def mount(source: str, target: Path, fstype: str | None, flags: int, data: str | None = None) -> None:
    check(
        _libc.mount(
            source.encode(), str(target).encode(), fstype.encode() if fstype else None, flags,
            data.encode() if data else None,
        ),
        f"mount {target}",
    )  # fmt: skip


def umount(target: Path) -> None:
    if _libc.umount2(str(target).encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):  # not mounted (any more)
            raise OSError(err, f"umount {target}: {os.strerror(err)}")


def idmapped_tree(path: str, userns_fd: int) -> int:
    """A detached clone of ``path`` whose owners are shifted into the given user namespace."""
    tree = check(
        _libc.syscall(SYS_OPEN_TREE, AT_FDCWD, path.encode(), OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC),
        f"open_tree {path}",
    )
    attr = struct.pack("QQQQ", MOUNT_ATTR_IDMAP, 0, 0, userns_fd)
    try:
        check(
            _libc.syscall(SYS_MOUNT_SETATTR, tree, b"", AT_EMPTY_PATH, attr, len(attr)),
            f"idmap {path}",
        )
    except OSError:
        os.close(tree)
        raise
    return tree


def unmount_sandbox(sandbox_dir: Path) -> None:
    for mountpoint in (sandbox_dir / "m", sandbox_dir / "pts", sandbox_dir / "rw"):
        umount(mountpoint)
        if os.path.ismount(mountpoint):
            raise BackendError(f"{mountpoint} is still mounted")


def mount_disk(image: Path, target: Path, disk_mb: int) -> None:
    """The sandbox's disk: a sparse ext4 image on a loop device (autoclear: it goes with the last
    unmount). Filling it is ENOSPC for the writer, and its pages are page cache written back to the
    host's disk; a tmpfs would be charged to the sandbox's memory cgroup, so a full disk OOM-killed
    envd (issue 11). Without loop devices (some containers) it falls back to that tmpfs."""
    if not LOOP_CONTROL.exists():
        mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, f"size={disk_mb}m,mode=0700")
        return
    with open(image, "wb") as out:  # ext4's own metadata on top, so that disk_mb stay usable
        out.truncate((disk_mb + disk_mb // 32 + 4) * 1024 * 1024)
    for argv in (
        [MKFS_EXT4, "-q", "-F", "-m", "0", "-O", "^has_journal", "-E", "lazy_itable_init=1,nodiscard", str(image)],
        ["/bin/mount", "-t", "ext4", "-o", "loop,noinit_itable,nosuid,nodev", str(image), str(target)],
    ):
        done = subprocess.run(argv, capture_output=True, check=False)
        if done.returncode != 0:
            raise BackendError(f"{argv[0]} failed for {image}: {done.stderr.decode(errors='replace').strip()}")
    target.chmod(0o700)


def is_shared_mountpoint(path: Path) -> bool:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(path):
            optional = fields[6 : fields.index("-")]
            return any(tag.startswith("shared:") for tag in optional)
    return False
