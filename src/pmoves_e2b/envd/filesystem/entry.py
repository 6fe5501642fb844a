"""Build ``EntryInfo`` messages from the filesystem (names, modes and owners like Go's envd)."""

from __future__ import annotations

import grp
import os
import pwd
import stat
from functools import lru_cache

from protobuf.wkt.google.protobuf.timestamp_pb import Timestamp

from ..file_metadata import read_metadata
from ..gen.filesystem.filesystem_pb import EntryInfo, FileType


@lru_cache(maxsize=256)
def _owner(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


@lru_cache(maxsize=256)
def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _file_type(mode: int) -> FileType:
    if stat.S_ISDIR(mode):
        return FileType.DIRECTORY
    if stat.S_ISLNK(mode):
        return FileType.SYMLINK
    return FileType.FILE


def go_mode_string(mode: int) -> str:
    """Go's ``FileMode.String()``: one type letter (``d``, ``L``, ``-``...) then rwx bits."""
    kind = "-"
    if stat.S_ISDIR(mode):
        kind = "d"
    elif stat.S_ISLNK(mode):
        kind = "L"
    elif stat.S_ISFIFO(mode):
        kind = "p"
    elif stat.S_ISSOCK(mode):
        kind = "S"
    elif stat.S_ISCHR(mode):
        kind = "c"
    elif stat.S_ISBLK(mode):
        kind = "D"
    bits = "".join(ch if mode & (1 << (8 - i)) else "-" for i, ch in enumerate("rwxrwxrwx"))
    return kind + bits


def _timestamp(st: os.stat_result) -> Timestamp:
    return Timestamp(seconds=int(st.st_mtime_ns // 1_000_000_000), nanos=int(st.st_mtime_ns % 1_000_000_000))


def entry_info(path: str, st: os.stat_result | None = None) -> EntryInfo:
    """Entry for ``path`` (not following a final symlink: links report the target's type)."""
    link = st if st is not None else os.lstat(path)
    shown = link
    entry = EntryInfo(name=os.path.basename(path) or path, path=path)
    if stat.S_ISLNK(link.st_mode):
        entry.is_symlink = True
        entry.symlink_target = os.path.realpath(path)
        try:
            shown = os.stat(path)
        except OSError:
            shown = link  # dangling link: report the link itself
    entry.type = _file_type(shown.st_mode)
    entry.size = shown.st_size
    entry.mode = stat.S_IMODE(shown.st_mode) & 0o777
    entry.permissions = go_mode_string(shown.st_mode)
    entry.owner = _owner(link.st_uid)
    entry.group = _group(link.st_gid)
    entry.modified_time = _timestamp(link)
    metadata = read_metadata(path)
    if metadata:
        entry.metadata = metadata
    return entry
