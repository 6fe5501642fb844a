"""A preloaded library that lets coreutils run under this gVisor build (the only module running ``cc``).

runsc 0.0~20221219 answers statx(2) with EINVAL when AT_NO_AUTOMOUNT is set, and coreutils (ls,
stat, cp, ...) always sets it. gVisor has no automounts, so the shim drops the flag. It is built
once per host with the C compiler (no libc headers needed) and written into each sandbox's own
upper dir with /etc/ld.so.preload naming it; without a compiler those commands fail inside.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import threading
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = b"""
struct statx;
extern long syscall(long number, ...);
int statx(int dirfd, const char *path, int flags, unsigned int mask, struct statx *buf) {
    return (int)syscall(332 /* SYS_statx */, dirfd, path, flags & ~0x800 /* AT_NO_AUTOMOUNT */, mask, buf);
}
"""
LIBC = Path("/lib/x86_64-linux-gnu/libc.so.6")
BUILD_DIR = Path("/run/pmoves-e2b/gvisor")
INSIDE = "/usr/lib/pmoves-gvisor/statx.so"  # its path inside the sandbox
_lock = threading.Lock()


def built() -> Path | None:
    """The shim for this host (built on first use), or None when it cannot be built here."""
    target = BUILD_DIR / f"statx-{hashlib.sha256(SOURCE).hexdigest()[:12]}.so"
    with _lock:
        if target.exists():
            return target
        compiler = shutil.which("cc") or shutil.which("gcc")
        if compiler is None or not LIBC.exists():
            log.warning("gvisor: no C compiler; ls, stat and cp fail inside gVisor sandboxes (statx shim not built)")
            return None
        BUILD_DIR.mkdir(parents=True, exist_ok=True)
        source = BUILD_DIR / "statx.c"
        source.write_bytes(SOURCE)
        partial = target.with_suffix(".tmp")
        done = subprocess.run(
            [compiler, "-O2", "-shared", "-fPIC", "-nostdlib", "-o", str(partial), str(source), str(LIBC)],
            capture_output=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            log.warning("gvisor: statx shim not built: %s", done.stderr.decode(errors="replace")[-300:])
            return None
        partial.replace(target)
        return target


def install(upper: Path) -> None:
    """Put the shim and /etc/ld.so.preload into a sandbox's upper dir (before it starts)."""
    shim = built()
    if shim is None:
        return
    library = upper / INSIDE.lstrip("/")
    library.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shim, library)
    library.chmod(0o755)
    (upper / "etc").mkdir(mode=0o755, exist_ok=True)
    (upper / "etc" / "ld.so.preload").write_text(INSIDE + "\n")
