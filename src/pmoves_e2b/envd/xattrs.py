"""User file metadata, stored as ``user.e2b.<key>`` extended attributes (envd >= 0.6.2)."""

from __future__ import annotations

import errno
import os

PREFIX = "user.e2b."
_UNSUPPORTED = {errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENODATA, errno.EPERM, errno.EACCES}


def read_metadata(path: str) -> dict[str, str]:
    """The file's metadata map; empty where the filesystem has no xattrs."""
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


def clear_metadata(path: str) -> None:
    """Remove the file's metadata (an upload without metadata replaces the file, as E2B's envd);
    nothing to do where the filesystem has no xattrs."""
    try:
        replace_metadata(path, {})
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise


def replace_metadata(path: str, metadata: dict[str, str]) -> None:
    """Make ``metadata`` the file's whole metadata map (keys lower-cased, like E2B's envd)."""
    for name in os.listxattr(path):
        if name.startswith(PREFIX):
            os.removexattr(path, name)
    for key, value in metadata.items():
        os.setxattr(path, PREFIX + key.lower(), value.encode())
