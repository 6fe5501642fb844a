"""The data dir holds every sandbox's credentials: only its owner may read any of it.

Directories are 0700 and files 0600 whatever the umask; this module is the one place that says so.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if missing; ``path`` itself ends up 0700."""
    path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    os.chmod(path, DIR_MODE)
    return path


def open_private_append(path: Path) -> BinaryIO:
    """Open a log file for appending, created 0600 (and made 0600 if it was not)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    return os.fdopen(fd, "ab")


def make_private(*paths: Path) -> None:
    """chmod 0600 the files among ``paths`` that exist (e.g. a SQLite database and its -wal/-shm)."""
    for path in paths:
        try:
            os.chmod(path, FILE_MODE)
        except FileNotFoundError:
            continue
