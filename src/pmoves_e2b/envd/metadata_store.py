"""envd's own store of user xattrs, for files whose file system refuses them.

It holds every ``user.*`` name of a file (values kept as bytes, base64 in the JSON), set by envd
(E2B's metadata is the ``user.e2b.`` subset, file_metadata.py) or by a program in the sandbox through
the gVisor preload shim and envd's socket (program_xattrs.py), so both see the same map. One JSON file
per file, named by a hash of its path, in a root-only directory on the sandbox's own disk, so a pause,
a restart and a snapshot keep it as they keep the files. An entry is believed while the file at its
path has the owner and the modification time (to the nanosecond) it had when the map was written.
Nothing firmer is there to be had: a program that removes a file and makes it anew gets the same
inode number back, a restore or a snapshot's copy gives the same file another one, gVisor has no
birth times, and a hard link (which would hold the inode) keeps a removed file's space until the
sandbox ends in this runsc build. So any edit of the file's contents, a program's or envd's upload,
drops its whole map, the names a program set itself too (Linux's xattrs would keep them); a file
another user puts in its place never inherits it, while one its owner puts there with the same
time to the nanosecond (``touch -r``, ``cp -p``) does. A stale entry is dropped when read.

A program's own calls (program_xattrs.py) come with the file as an fd: ``read_at`` and ``write_at``
take the fd's own path (its /proc/self/fd link, resolved by the kernel) and check and touch the file
through the fd, so a path the program swaps meanwhile (a directory for a link) leads them to no
other file's entry. envd calls this only on its event loop's thread (the HTTP and RPC handlers and
the xattr socket alike), so a read-modify-write needs no lock.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from . import METADATA_STORE

STORE = Path(METADATA_STORE)

Xattrs = dict[str, bytes]  # full name (os.fsdecode of its bytes, like os.listxattr) -> value
Carried = list[tuple[str, Xattrs]]  # (path below the moved one, "" for itself; its map)

_created = False  # by this envd; only envd makes the store, so it is looked for once otherwise


@functools.cache
def _present_at_start() -> bool:
    return STORE.is_dir()


def _present() -> bool:
    """Whether the store exists, without a stat per file read where xattrs work (no store there)."""
    return _created or _present_at_start()


def _key(path: str) -> str:
    """The path with its directories resolved but not its last part (a link's own entry, like xattrs)."""
    absolute = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))


def _entry_file(key: str) -> Path:
    return STORE / (hashlib.sha256(key.encode()).hexdigest()[:40] + ".json")


def read(path: str) -> Xattrs:
    """The stored xattrs of the file at ``path``; empty without (or with a stale entry, dropped)."""
    key = _key(path)
    return _read(key, lambda: os.lstat(key))


def read_at(fd: int, path: str) -> Xattrs:
    """The stored xattrs of the file open as ``fd``, whose own path is ``path`` (see the module)."""
    return _read(path, lambda: os.fstat(fd))


def write(path: str, xattrs: Xattrs) -> None:
    """Make ``xattrs`` the whole stored map of the file at ``path`` (an empty map removes it)."""
    key = _key(path)
    if not xattrs:
        forget(key)
        return
    # gVisor's sentry keeps its own time of the last write and the host file has another (the
    # gofer's); setting it makes both the same, so a restore or a copy reads back the one recorded
    st = os.lstat(key)
    os.utime(key, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    _write(key, os.lstat(key), xattrs)  # read back: a file system may keep fewer digits


def write_at(fd: int, path: str, xattrs: Xattrs) -> None:
    """As ``write``, for the file open as ``fd`` whose own path is ``path`` (see the module)."""
    if not xattrs:
        forget(path)
        return
    st = os.fstat(fd)
    os.utime(f"/proc/self/fd/{fd}", ns=(st.st_atime_ns, st.st_mtime_ns))  # the fd's file, not the path's
    _write(path, os.fstat(fd), xattrs)


def forget(path: str) -> None:
    if _present():
        _entry_file(_key(path)).unlink(missing_ok=True)


def _read(key: str, stat_now: Callable[[], os.stat_result]) -> Xattrs:
    if not _present():
        return {}
    entry_file = _entry_file(key)
    entry = _load(entry_file)
    if entry is None or entry.get("path") != key:
        return {}
    try:
        xattrs = _valid_xattrs(entry, stat_now())
    except OSError:
        xattrs = None
    if xattrs is None:
        entry_file.unlink(missing_ok=True)
        return {}
    return xattrs


def _write(key: str, st: os.stat_result, xattrs: Xattrs) -> None:
    global _created
    STORE.mkdir(mode=0o700, parents=True, exist_ok=True)
    _created = True
    encoded = {name: base64.b64encode(value).decode() for name, value in xattrs.items()}
    _save(_entry_file(key), {"path": key, "mtime_ns": st.st_mtime_ns, "uid": st.st_uid, "xattrs": encoded})


def forget_tree(path: str) -> None:
    """Drop the entries of ``path`` and of everything under it."""
    for entry_file, _ in _entries_under(_key(path)):
        entry_file.unlink(missing_ok=True)


def take_tree(path: str) -> Carried:
    """Remove the entries of ``path`` and everything under it, returning the maps still valid, to be
    written again for its new path (``put_tree``)."""
    key = _key(path)
    carried: Carried = []
    for entry_file, entry in _entries_under(key):
        try:
            xattrs = _valid_xattrs(entry, os.lstat(str(entry.get("path"))))
        except OSError:
            xattrs = None
        if xattrs is not None:
            carried.append((str(entry["path"])[len(key) :], xattrs))
        entry_file.unlink(missing_ok=True)
    return carried


def put_tree(path: str, carried: Carried) -> None:
    """Write maps taken by ``take_tree`` for the tree now at ``path`` (replacing what it had)."""
    forget_tree(path)
    key = _key(path)
    for below, xattrs in carried:
        with contextlib.suppress(FileNotFoundError):  # gone meanwhile
            write(key + below, xattrs)


def _valid_xattrs(entry: dict[str, object], st: os.stat_result) -> Xattrs | None:
    """The entry's map if ``st`` (the file's now) is of the file it was written for."""
    xattrs = entry.get("xattrs")
    owner = entry.get("uid", st.st_uid)  # entries from before owners were recorded: the time alone
    if st.st_mtime_ns != entry.get("mtime_ns") or st.st_uid != owner or not isinstance(xattrs, dict):
        return None
    try:
        return {str(name): base64.b64decode(str(value), validate=True) for name, value in xattrs.items()}
    except binascii.Error:  # not written by envd: believed as much as a missing entry
        return None


def _entries_under(key: str) -> list[tuple[Path, dict[str, object]]]:
    """The entries of ``key`` and of the paths under it."""
    if not _present():
        return []
    below = key.rstrip("/") + "/"
    found: list[tuple[Path, dict[str, object]]] = []
    for entry_file in STORE.glob("*.json"):
        entry = _load(entry_file)
        named = entry.get("path") if entry is not None else None
        if entry is not None and isinstance(named, str) and (named == key or named.startswith(below)):
            found.append((entry_file, entry))
    return found


def _load(entry_file: Path) -> dict[str, object] | None:
    try:
        loaded = json.loads(entry_file.read_bytes())
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


def _save(entry_file: Path, entry: dict[str, object]) -> None:
    temporary = entry_file.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(json.dumps(entry).encode())
    os.replace(temporary, entry_file)
