"""Directory watching with inotify (via libc, no threads): the loop reads the inotify fd."""

from __future__ import annotations

import asyncio
import ctypes
import os
import struct
from collections.abc import Callable
from pathlib import Path

from ..gen.filesystem.filesystem_pb import EventType, FilesystemEvent
from .entry import entry_info

IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x1000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
WATCH_MASK = IN_CREATE | IN_MODIFY | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_ATTRIB | IN_DELETE_SELF | IN_MOVE_SELF
_HEADER = struct.Struct("iIII")
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse", "9p", "ceph", "glusterfs")

_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _event_type(mask: int) -> EventType | None:
    if mask & (IN_CREATE | IN_MOVED_TO):
        return EventType.CREATE
    if mask & IN_MODIFY:
        return EventType.WRITE
    if mask & (IN_DELETE | IN_DELETE_SELF):
        return EventType.REMOVE
    if mask & (IN_MOVED_FROM | IN_MOVE_SELF):
        return EventType.RENAME
    if mask & IN_ATTRIB:
        return EventType.CHMOD
    return None


def is_network_mount(path: str) -> bool:
    """True when the mount holding ``path`` is a network or FUSE filesystem. 9p over a file
    descriptor (``trans=fd``) is gVisor's gofer serving the sandbox's own files: every change goes
    through the sandbox's kernel, so inotify sees it, unlike a remote share."""
    best, fstype, options = "", "", ""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return False
    real = os.path.realpath(path)
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount_point = fields[1].replace("\\040", " ")
        inside = real == mount_point or real.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, fstype, options = mount_point, fields[2], fields[3] if len(fields) > 3 else ""
    if fstype == "9p" and "trans=fd" in options.split(","):
        return False
    return fstype.split(".")[0] in NETWORK_FILESYSTEMS


class Watcher:
    """Watches ``root`` (and, if recursive, every directory below it) and reports events."""

    def __init__(
        self, root: str, recursive: bool, include_entry: bool, emit: Callable[[FilesystemEvent], None]
    ) -> None:
        self.root = root
        self._recursive = recursive
        self._include_entry = include_entry
        self._emit = emit
        self._dirs: dict[int, str] = {}
        self._loop = asyncio.get_running_loop()
        self._fd = _lib().inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self._fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        try:
            self._add_tree(root)
        except BaseException:
            os.close(self._fd)
            raise
        self._loop.add_reader(self._fd, self._on_readable)

    def _add(self, directory: str) -> None:
        wd = _lib().inotify_add_watch(self._fd, os.fsencode(directory), WATCH_MASK | IN_ONLYDIR)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), directory)
        self._dirs[wd] = directory

    def _add_tree(self, directory: str) -> None:
        self._add(directory)
        if not self._recursive:
            return
        for parent, subdirs, _ in os.walk(directory):
            for name in subdirs:
                try:
                    self._add(os.path.join(parent, name))
                except OSError:
                    continue  # vanished or unreadable meanwhile

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, 64 << 10)
        except BlockingIOError:
            return
        offset = 0
        while offset + _HEADER.size <= len(data):
            wd, mask, _cookie, length = _HEADER.unpack_from(data, offset)
            raw_name = data[offset + _HEADER.size : offset + _HEADER.size + length].rstrip(b"\0")
            offset += _HEADER.size + length
            self._handle(wd, mask, os.fsdecode(raw_name))

    def _handle(self, wd: int, mask: int, name: str) -> None:
        if mask & IN_IGNORED:
            self._dirs.pop(wd, None)
            return
        directory = self._dirs.get(wd)
        if directory is None or mask & IN_Q_OVERFLOW:
            return
        if mask & (IN_DELETE_SELF | IN_MOVE_SELF) and directory != self.root:
            return  # reported by the parent's watch already
        path = os.path.join(directory, name) if name else directory
        if self._recursive and mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO):
            try:
                self._add_tree(path)
            except OSError:
                pass
        kind = _event_type(mask)
        if kind is None:
            return
        event = FilesystemEvent(name=os.path.relpath(path, self.root), type=kind)
        if self._include_entry and kind not in (EventType.REMOVE, EventType.RENAME):
            try:
                event.entry = entry_info(path)
            except OSError:
                pass
        self._emit(event)

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
