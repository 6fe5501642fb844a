"""A preloaded library that works around what this gVisor build lacks in three calls.

runsc 0.0~20221219 answers two with EINVAL where Linux does not, and one needs a record:
- statx(2) with AT_NO_AUTOMOUNT, which coreutils (ls, stat, cp, ...) always sets. gVisor has no
  automounts, so the shim drops the flag.
- close_range(2) with ``last`` above INT_MAX: it reads it as a signed int, so the usual "to the last
  fd" call, close_range(fd, ~0U, flags), looks like last < first. GLib's spawn makes that call in
  every child and gives up on it (XFCE started none of its components: no desktop on gVisor). No fd
  is above INT_MAX, so the shim passes INT_MAX instead.
- tcsetpgrp(3): its terminal has no ISIG, so envd sends ^C's SIGINT itself (envd/process/tty_signals.py),
  and tells the terminal's foreground group by no ioctl nor /proc here: the shim writes the group a
  shell makes foreground to /dev/shm/.pmoves-tty-foreground-<session> (0600, the shell's user).
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
extern int *__errno_location(void);
static void remember_foreground(int pgrp) {
    char path[64] = "/dev/shm/.pmoves-tty-foreground-", digits[16];
    int end = 32, count = 0, errno_before = *__errno_location();
    long sid = syscall(124 /* SYS_getsid */, 0);
    do { digits[count++] = (char)('0' + sid % 10); sid /= 10; } while (sid > 0 && count < 15);
    while (count > 0) path[end++] = digits[--count];
    path[end] = 0;
    do { digits[count++] = (char)('0' + pgrp % 10); pgrp /= 10; } while (pgrp > 0 && count < 15);
    for (int left = 0, right = count - 1; left < right; left++, right--) {
        char swap = digits[left]; digits[left] = digits[right]; digits[right] = swap;
    }
    /* O_WRONLY|O_CREAT|O_TRUNC|O_NOFOLLOW|O_CLOEXEC, 0600 */
    long fd = syscall(257 /* SYS_openat */, -100 /* AT_FDCWD */, path, 0x1 | 0x40 | 0x200 | 0x20000 | 0x80000, 0600);
    if (fd >= 0) {
        syscall(1 /* SYS_write */, fd, digits, count);
        syscall(3 /* SYS_close */, fd);
    }
    *__errno_location() = errno_before;
}
int tcsetpgrp(int fd, int pgrp) {
    int done = (int)syscall(16 /* SYS_ioctl */, fd, 0x5410 /* TIOCSPGRP */, &pgrp);
    if (done == 0) remember_foreground(pgrp);
    return done;
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
