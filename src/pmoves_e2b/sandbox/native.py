"""Small C programs, built once per host with the C compiler (the only module running ``cc``): the
gvisor tier's subreaper and syscall shim, envd's spawn helper in the template build.

Each is named by a hash of its source under ``BUILD_DIR``, so a changed source is built again and
an unchanged one never; a host without a compiler (or a failed build) gets None, and the caller
says what is lost without it.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import threading
from pathlib import Path

log = logging.getLogger(__name__)

BUILD_DIR = Path("/run/pmoves-e2b/native")
_lock = threading.Lock()


def build(name: str, source: bytes, suffix: str, flags: tuple[str, ...], after: tuple[str, ...] = ()) -> Path | None:
    """``cc <flags> -o <name>-<hash><suffix> <source> <after>``, once per host; None when it cannot be built."""
    target = BUILD_DIR / f"{name}-{hashlib.sha256(source).hexdigest()[:12]}{suffix}"
    with _lock:
        if target.exists():
            return target
        compiler = shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            log.warning("no C compiler (apt-get install gcc libc6-dev): %s not built", name)
            return None
        BUILD_DIR.mkdir(parents=True, exist_ok=True)
        source_file = BUILD_DIR / f"{name}.c"
        source_file.write_bytes(source)
        partial = target.with_suffix(".tmp")
        done = subprocess.run(
            [compiler, *flags, "-o", str(partial), str(source_file), *after],
            capture_output=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            log.warning("%s not built: %s", name, done.stderr.decode(errors="replace")[-300:])
            return None
        partial.replace(target)
        return target
