"""User file metadata, stored as ``user.e2b.<key>`` extended attributes (envd >= 0.6.2), as E2B's envd.

Where the file system refuses user xattrs, envd keeps them in its own store (metadata_store.py)
instead: gVisor's gofer serves the sandbox's root without them in this runsc build (ENOTSUP for every
process in the sandbox, root too), and its checkpoint, snapshot and disk accounting all need the files
on the host, so an in-sandbox overlay that has xattrs is no way out. The store's map follows the file
through envd's own writes, moves and removals (a program's edit drops it: see metadata_store.py). A
program's own xattr calls reach the same store through the gVisor shim and envd's socket
(program_xattrs.py), so metadata set either way is seen the other way. The metadata is the
``user.e2b.`` subset of the map: replacing it keeps the file's other ``user.*`` names.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

from . import metadata_store

PREFIX = "user.e2b."
_UNSUPPORTED = {errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENODATA, errno.EPERM, errno.EACCES}
_NO_USER_XATTRS = {errno.ENOTSUP, errno.EOPNOTSUPP}


def read_metadata(path: str) -> dict[str, str]:
    """The file's metadata map (its xattrs, else the store's entry); empty where it has none."""
    found = _read_xattrs(path)
    if found:
        return found
    stored = metadata_store.read(path).items()
    return {name[len(PREFIX) :]: value.decode("utf-8", "replace") for name, value in stored if name.startswith(PREFIX)}


def clear_metadata(path: str) -> None:
    """Remove the file's metadata (an upload without metadata replaces the file, as E2B's envd)."""
    _replace_stored(path, {})
    try:
        _replace_xattrs(path, {})
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise


def replace_metadata(path: str, metadata: dict[str, str]) -> None:
    """Make ``metadata`` the file's whole metadata map (keys lower-cased, like E2B's envd)."""
    lowered = {key.lower(): value for key, value in metadata.items()}
    try:
        _replace_xattrs(path, lowered)
    except OSError as exc:
        if exc.errno not in _NO_USER_XATTRS:
            raise
        _replace_stored(path, lowered)
        return
    _replace_stored(path, {})


@contextlib.contextmanager
def moving(source: str, destination: str) -> Iterator[None]:
    """Around a rename of ``source`` to ``destination``: stored maps go with it (xattrs do by
    themselves), or stay if the rename fails."""
    carried = metadata_store.take_tree(source)
    try:
        yield
    except BaseException:
        metadata_store.put_tree(source, carried)
        raise
    metadata_store.put_tree(destination, carried)


def removed(path: str) -> None:
    """``path`` (a file or a whole tree) was removed: its stored maps go too."""
    metadata_store.forget_tree(path)


def _replace_stored(path: str, metadata: dict[str, str]) -> None:
    kept = {name: value for name, value in metadata_store.read(path).items() if not name.startswith(PREFIX)}
    metadata_store.write(path, kept | {PREFIX + key: value.encode() for key, value in metadata.items()})


def _read_xattrs(path: str) -> dict[str, str]:
    try:
        names = [n for n in os.listxattr(path, follow_symlinks=False) if n.startswith(PREFIX)]
    except OSError:
        return {}
    metadata: dict[str, str] = {}
    for name in names:
        try:
            metadata[name[len(PREFIX) :]] = os.getxattr(path, name, follow_symlinks=False).decode("utf-8", "replace")
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
    return metadata


def _replace_xattrs(path: str, metadata: dict[str, str]) -> None:
    for name in os.listxattr(path):
        if name.startswith(PREFIX):
            os.removexattr(path, name)
    for key, value in metadata.items():
        os.setxattr(path, PREFIX + key, value.encode())
