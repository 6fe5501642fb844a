"""A preloaded library that works around two syscalls of this gVisor build.

runsc 0.0~20221219 answers with EINVAL where Linux does not:
- statx(2) with AT_NO_AUTOMOUNT, which coreutils (ls, stat, cp, ...) always sets. gVisor has no
  automounts, so the shim drops the flag.
- close_range(2) with ``last`` above INT_MAX: it reads it as a signed int, so the usual "to the last
  fd" call, close_range(fd, ~0U, flags), looks like last < first. GLib's spawn makes that call in
  every child and gives up on it (XFCE started none of its components: no desktop on gVisor). No fd
  is above INT_MAX, so the shim passes INT_MAX instead.
It is built once per host with the C compiler (``native.py``; no libc headers needed) and written into each
sandbox's own upper dir with /etc/ld.so.preload naming it; without a compiler those programs fail
inside (statically linked ones and raw syscalls are not covered: a preload cannot reach them).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from pmoves_e2b.sandbox import native

log = logging.getLogger(__name__)

SOURCE = b"""
struct statx;
extern long syscall(long number, ...);
int statx(int dirfd, const char *path, int flags, unsigned int mask, struct statx *buf) {
    return (int)syscall(332 /* SYS_statx */, dirfd, path, flags & ~0x800 /* AT_NO_AUTOMOUNT */, mask, buf);
}
int close_range(unsigned int first, unsigned int last, int flags) {
    return (int)syscall(436 /* SYS_close_range */, first, last > 0x7fffffffu ? 0x7fffffffu : last, flags);
}
"""
LIBC = Path("/lib/x86_64-linux-gnu/libc.so.6")
INSIDE = "/usr/lib/pmoves-gvisor/syscalls.so"  # its path inside the sandbox


def built() -> Path | None:
    """The shim for this host (built on first use), or None when it cannot be built here."""
    if not LIBC.exists():
        return None
    shim = native.build("syscalls", SOURCE, ".so", ("-O2", "-shared", "-fPIC", "-nostdlib"), (str(LIBC),))
    if shim is None:
        log.warning("gvisor: ls, stat and cp fail inside gVisor sandboxes (syscall shim not built)")
    return shim


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
