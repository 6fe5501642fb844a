"""Mounts of the ns backend through libc (mount, umount2, open_tree + mount_setattr for idmapped
layers) and the sandbox's disk (a sparse ext4 image on a loop device, attached by ioctl)."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from pmoves_e2b.sandbox.backends.base import BackendError

log = logging.getLogger(__name__)

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
LOOP_CTL_GET_FREE, LOOP_CONFIGURE = 0x4C82, 0x4C0A
LO_FLAGS_AUTOCLEAR = 4
LOOP_ATTEMPTS = 20  # another process may bind the free device we were given first: ask again


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
    """Unmount the sandbox's trees, then wait until its disk's loop device is detached."""
    disk = sandbox_dir / "rw"
    loop = _loop_device_of(disk) if os.path.ismount(disk) else None
    for mountpoint in (sandbox_dir / "m", sandbox_dir / "pts", disk):
        umount(mountpoint)
        if os.path.ismount(mountpoint):
            raise BackendError(f"{mountpoint} is still mounted")
    if loop is not None:
        _wait_detached(loop, sandbox_dir / "disk.img")


LOOP_DETACH_TIMEOUT = 2.0  # s; the kernel worker takes ms: longer means another mount namespace holds it


def _loop_device_of(mountpoint: Path) -> str | None:
    """The loop device (``loopN``) a mounted disk is on; None for a tmpfs disk."""
    dev = os.stat(mountpoint).st_dev
    name = os.path.basename(os.path.realpath(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"))
    return name if name.startswith("loop") else None


def _backs(backing_file: Path, image: Path) -> bool:
    try:
        return backing_file.read_text().strip().removesuffix(" (deleted)") == str(image)
    except OSError:
        return False  # detached meanwhile: the attribute goes with the binding


def _wait_detached(loop: str, image: Path) -> None:
    """Until ``loop`` no longer backs ``image`` (bounded). The lazy unmount returns before the
    kernel lets go of the device whenever it was not the last reference to the disk's file system:
    when the sandbox's mount namespace went last, a kernel worker puts its final mount a moment
    later (a destroy that returned at once left the device attached, which the leak check saw); a
    host process with a file of the disk open keeps it until it closes that. A mount namespace some
    other process made while the disk was mounted (``unshare -m``, ``ip netns exec``) holds a copy
    of the mount for as long as it lives: not the sandbox's to end, so past the bound destroy goes
    on and autoclear detaches the device once that copy goes. Sleeps 1, 2, 4 ... 32 ms between looks."""
    backing_file = Path("/sys/block", loop, "loop", "backing_file")
    deadline = time.monotonic() + LOOP_DETACH_TIMEOUT
    delay = 0.001
    while _backs(backing_file, image):
        if time.monotonic() >= deadline:
            log.warning(
                "/dev/%s still holds %s %.0fs after the unmount (%s); it detaches itself when they let go",
                loop, image, LOOP_DETACH_TIMEOUT, _holders(loop) or "a file of it is open on the host",
            )  # fmt: skip
            return
        time.sleep(delay)
        delay = min(delay * 2, 0.032)


def _holders(loop: str) -> str:
    """Processes whose mount namespace still has ``loop`` mounted (one per namespace), for the log."""
    found: dict[str, str] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            namespace = os.readlink(f"/proc/{pid}/ns/mnt")
            if namespace not in found and f" /dev/{loop} " in Path(f"/proc/{pid}/mountinfo").read_text():
                found[namespace] = f"pid {pid} {Path(f'/proc/{pid}/comm').read_text().strip()}"
        except OSError:
            continue  # gone meanwhile
    return "mounted in the namespace of " + ", ".join(found.values()) if found else ""


def mount_disk(image: Path, target: Path, disk_mb: int) -> None:
    """The sandbox's disk: a sparse ext4 image on a loop device (autoclear: it goes with the last
    unmount). Filling it is ENOSPC for the writer, and its pages are page cache written back to the
    host's disk; a tmpfs would be charged to the sandbox's memory cgroup, so a full disk OOM-killed
    envd (issue 11). Without loop devices (some containers) it falls back to that tmpfs.

    No exec per sandbox: the image is a copy of a blank file system made once per size (mkfs.ext4
    writes ~1 MB of metadata into the sparse file; only those extents are kept and written), the
    loop device is attached with LOOP_CONFIGURE and mounted with mount(2)."""
    if not LOOP_CONTROL.exists():
        mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, f"size={disk_mb}m,mode=0700")
        return
    size = (disk_mb + disk_mb // 32 + 4) * 1024 * 1024  # ext4's own metadata on top, so that disk_mb stay usable
    extents = _blank_ext4(size)
    backing = os.open(image, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(backing, size)
        for offset, data in extents:
            os.pwrite(backing, data, offset)
        loop, loop_fd = _attach_loop(backing, image)
    finally:
        os.close(backing)
    try:
        mount(loop, target, "ext4", MS_NOSUID | MS_NODEV, "noinit_itable")
    except OSError as exc:
        raise BackendError(f"mounting {image} ({loop}) failed: {exc}") from exc
    finally:
        os.close(loop_fd)  # the mount holds the device now; never mounted: autoclear detaches it
    target.chmod(0o700)


_blank_lock = threading.Lock()
_blank_images: dict[int, list[tuple[int, bytes]]] = {}


def _blank_ext4(size: int) -> list[tuple[int, bytes]]:
    """The data extents (offset, bytes) of a freshly made ext4 image of ``size`` bytes."""
    with _blank_lock:
        extents = _blank_images.get(size)
        if extents is not None:
            return extents
        with tempfile.TemporaryDirectory(prefix="pmoves-e2b-disk-") as scratch:
            path = Path(scratch) / "blank.img"
            with open(path, "wb") as out:
                out.truncate(size)
            argv = [MKFS_EXT4, "-q", "-F", "-m", "0", "-O", "^has_journal", "-E", "lazy_itable_init=1,nodiscard"]
            done = subprocess.run([*argv, str(path)], capture_output=True, check=False)
            if done.returncode != 0:
                raise BackendError(f"{MKFS_EXT4} failed: {done.stderr.decode(errors='replace').strip()}")
            extents = []
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                offset = 0
                while offset < size:
                    try:
                        start = os.lseek(fd, offset, os.SEEK_DATA)
                    except OSError as exc:
                        if exc.errno != errno.ENXIO:  # ENXIO: no data after offset
                            raise
                        break
                    end = os.lseek(fd, start, os.SEEK_HOLE)
                    extents.append((start, os.pread(fd, end - start, start)))
                    offset = end
            finally:
                os.close(fd)
        _blank_images[size] = extents
        return extents


def _attach_loop(backing: int, image: Path) -> tuple[str, int]:
    """A free loop device bound to ``backing``, with autoclear: its path and an open fd of it."""
    control = os.open(LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
    try:
        for _ in range(LOOP_ATTEMPTS):
            number = fcntl.ioctl(control, LOOP_CTL_GET_FREE)
            path = f"/dev/loop{number}"
            try:
                loop = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # its node not made yet
            # struct loop_config: fd, block_size, loop_info64 (..., lo_flags, lo_file_name[64], ...), reserved
            name = str(image).encode()[:63]
            config = struct.pack("<II5Q4I64s64s32s2Q8Q", backing, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                 LO_FLAGS_AUTOCLEAR, name, b"", b"", 0, 0, *([0] * 8))  # fmt: skip
            try:
                fcntl.ioctl(loop, LOOP_CONFIGURE, config)
            except OSError as exc:
                os.close(loop)
                if exc.errno == errno.EBUSY:
                    continue  # taken meanwhile
                raise BackendError(f"cannot attach {image} to {path}: {exc}") from exc
            return path, loop
    finally:
        os.close(control)
    raise BackendError(f"no free loop device for {image} after {LOOP_ATTEMPTS} attempts")


def is_shared_mountpoint(path: Path) -> bool:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(path):
            optional = fields[6 : fields.index("-")]
            return any(tag.startswith("shared:") for tag in optional)
    return False
