"""A preloaded library that works around what this gVisor build lacks in a few calls.

runsc 0.0~20221219 answers two with EINVAL where Linux does not, one needs a record and one a store:
- statx(2) with AT_NO_AUTOMOUNT, which coreutils (ls, stat, cp, ...) always sets. gVisor has no
  automounts, so the shim drops the flag.
- close_range(2) with ``last`` above INT_MAX: it reads it as a signed int, so the usual "to the last
  fd" call, close_range(fd, ~0U, flags), looks like last < first. GLib's spawn makes that call in
  every child and gives up on it (XFCE started none of its components: no desktop on gVisor). No fd
  is above INT_MAX, so the shim passes INT_MAX instead.
- tcsetpgrp(3): its terminal has no ISIG, so envd sends ^C's SIGINT itself (envd/process/tty_signals.py),
  and tells the terminal's foreground group by no ioctl nor /proc here: the shim writes the group a
  shell makes foreground to /dev/shm/.pmoves-tty-foreground-<session> (0600, the shell's user).
- the xattr calls (get/set/list/remove, their l* and f* forms): this runsc's gofer refuses user xattrs
  on the root (ENOTSUP, root too) and lists none. On ENOTSUP for a ``user.`` name, or after a listing
  where a probe of one gets ENOTSUP, the shim asks envd (envd/xattr_socket.py; the socket's path is
  envd's ``XATTR_SOCKET``), which answers from the store its file metadata uses, with Linux's errnos.
  It passes the file as an fd: O_PATH from its own look-up (O_NOFOLLOW for l*), or the caller's for
  f*, so envd resolves no path. Without envd's socket the program gets the ENOTSUP it got before;
  envd's own process sets ``pmoves_xattr_in_envd`` so it never asks itself.
It is built once per host with the C compiler (``native.py``; no libc headers needed) and written into each
sandbox's own upper dir with /etc/ld.so.preload naming it; without a compiler those programs fail
inside (statically linked ones and raw syscalls are not covered: a preload cannot reach them).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from pmoves_e2b.envd import METADATA_STORE, XATTR_SOCKET
from pmoves_e2b.sandbox import native

log = logging.getLogger(__name__)

# The xattr calls (see the docstring). Each kind of call is one function over the three forms: ``form``
# 0 = by path, 1 = l* (the link itself), 2 = f* (``file`` is the caller's fd), so the syscall of a
# form is the path one's number + form. errno 95 is ENOTSUP (= EOPNOTSUPP), 4 EINTR.
XATTRS_SOURCE_TEMPLATE = b"""
int pmoves_xattr_in_envd;  /* set by envd in its own process (envd/xattr_socket.py) */
enum { GET = 1, SET = 2, LIST = 3, REMOVE = 4, SIZE_QUERY = 1 };
struct iovec { const void *base; unsigned long length; };
struct msghdr {
    void *name; unsigned int name_length; struct iovec *iov; unsigned long iov_count;
    void *control; unsigned long control_length; int flags;
};
struct sockaddr_un { unsigned short family; char path[108]; };
static int user_name(const char *name) {
    return name && name[0] == 'u' && name[1] == 's' && name[2] == 'e' && name[3] == 'r' && name[4] == '.';
}
static unsigned int length(const char *text) {
    unsigned int count = 0;
    while (text[count]) count++;
    return count;
}
static long retried(long number, long sock, struct msghdr *message, int flags) {
    long done;
    do done = syscall(number, sock, message, flags);
    while (done < 0 && *__errno_location() == 4);
    return done;
}
/* One request to envd about the file open as fd: the result, or -errno (ENOTSUP without envd). */
static long ask(long fd, unsigned int op, unsigned int flags, const char *name, const void *value,
                unsigned long size, void *out) {
    struct sockaddr_un address = {1 /* AF_UNIX */, "@SOCKET@"};
    long result = -95;
    /* AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC */
    long sock = syscall(41 /* SYS_socket */, 1, 5 | 0x80000, 0);
    if (sock < 0) return result;
    if (syscall(42 /* SYS_connect */, sock, &address, sizeof address) == 0) {
        /* a buffer's size counts up to XATTR_SIZE_MAX (as Linux's), a value is no larger (E2BIG first) */
        unsigned int header[4] = {op, flags, size > 65536 ? 65536 : (unsigned int)size, name ? length(name) : 0};
        struct iovec request[3] = {{header, sizeof header}, {name, header[3]}, {value, op == SET ? size : 0}};
        /* the file, and who asks: this runsc's SO_PEERCRED names the listener, not the peer, so the
           caller sends its credentials, which the kernel checks are its own */
        struct {
            struct { unsigned long length; int level, type; int fd, padding; } rights;
            struct { unsigned long length; int level, type; int pid, uid, gid, padding; } credentials;
        } control = {
            {20 /* CMSG_LEN(4) */, 1 /* SOL_SOCKET */, 1 /* SCM_RIGHTS */, (int)fd, 0},
            {28 /* CMSG_LEN(12) */, 1, 2 /* SCM_CREDENTIALS */, (int)syscall(39 /* SYS_getpid */),
             (int)syscall(107 /* SYS_geteuid */), (int)syscall(108 /* SYS_getegid */), 0},
        };
        struct msghdr message = {0, 0, request, 3, &control, sizeof control, 0};
        if (retried(46 /* SYS_sendmsg */, sock, &message, 0x4000 /* MSG_NOSIGNAL */) >= 0) {
            int reply = 0;
            struct iovec answer[2] = {{&reply, sizeof reply}, {out, out && op != SET ? size : 0}};
            struct msghdr back = {0, 0, answer, 2, 0, 0, 0};
            if (retried(47 /* SYS_recvmsg */, sock, &back, 0) >= (long)sizeof reply) result = reply;
        }
    }
    syscall(3 /* SYS_close */, sock);
    return result;
}
static long ask_about(int form, long file, unsigned int op, unsigned int flags, const char *name,
                      const void *value, unsigned long size, void *out) {
    if (pmoves_xattr_in_envd) return -95;
    if (op == SET && size > 65536) return -7; /* E2BIG, as the syscall answered before ENOTSUP */
    long fd = file;
    if (form != 2) {
        /* O_PATH | O_CLOEXEC, and O_NOFOLLOW for the l* calls */
        fd = syscall(257 /* SYS_openat */, -100 /* AT_FDCWD */, file, 0x200000 | 0x80000 | (form ? 0x20000 : 0));
        if (fd < 0) return -*__errno_location();
    }
    long result = ask(fd, op, flags, name, value, size, out);
    if (form != 2) syscall(3 /* SYS_close */, fd);
    return result;
}
static long answered(long result, int errno_before) {
    *__errno_location() = result < 0 ? (int)-result : errno_before;
    return result < 0 ? -1 : result;
}
static long get(int form, long file, const char *name, void *value, unsigned long size) {
    int errno_before = *__errno_location();
    long done = syscall(191 /* SYS_getxattr */ + form, file, name, value, size);
    if (done >= 0 || *__errno_location() != 95 || !user_name(name)) return done;
    return answered(ask_about(form, file, GET, size ? 0 : SIZE_QUERY, name, 0, size, value), errno_before);
}
static long set(int form, long file, const char *name, const void *value, unsigned long size, int flags) {
    int errno_before = *__errno_location();
    long done = syscall(188 /* SYS_setxattr */ + form, file, name, value, size, flags);
    if (done >= 0 || *__errno_location() != 95 || !user_name(name)) return done;
    return answered(ask_about(form, file, SET, (unsigned int)flags, name, value, size, 0), errno_before);
}
static long unset(int form, long file, const char *name) {
    int errno_before = *__errno_location();
    long done = syscall(197 /* SYS_removexattr */ + form, file, name);
    if (done >= 0 || *__errno_location() != 95 || !user_name(name)) return done;
    return answered(ask_about(form, file, REMOVE, 0, name, 0, 0, 0), errno_before);
}
/* The file system's own names, then the store's: this gofer lists none where it refuses user names,
   so a user name read (ENOTSUP there, ENODATA where they work) tells whether to ask; a file the
   caller may not read (EACCES, 13) tells nothing, and a listing needs no read permission. */
static long list(int form, long file, char *names, unsigned long size) {
    int errno_before = *__errno_location();
    long done = syscall(194 /* SYS_listxattr */ + form, file, names, size);
    if (done < 0 && *__errno_location() != 95) return done;
    int listing_errno = *__errno_location();
    /* envd stores nothing before it makes its store: a listing (cp -a, Python's copy2) asks it only
       after that (a round trip is ~0.5 ms under ptrace, the check ~10 us) */
    long store = syscall(269 /* SYS_faccessat */, -100 /* AT_FDCWD */, "@STORE@", 0 /* F_OK */);
    long probe = store < 0 && *__errno_location() == 2 /* ENOENT */
        ? 0 : syscall(191 /* SYS_getxattr */ + form, file, "user.pmoves.probe", 0, 0);
    if (probe >= 0 || (*__errno_location() != 95 && *__errno_location() != 13)) {
        *__errno_location() = done < 0 ? listing_errno : errno_before;
        return done;
    }
    long own = done < 0 ? 0 : done, left = size ? (long)size - own : 0;
    long more = ask_about(form, file, LIST, size ? 0 : SIZE_QUERY, 0, 0, (unsigned long)left, size ? names + own : 0);
    return answered(more < 0 ? more : own + more, errno_before);
}
long getxattr(const char *path, const char *name, void *value, unsigned long size) {
    return get(0, (long)path, name, value, size);
}
long lgetxattr(const char *path, const char *name, void *value, unsigned long size) {
    return get(1, (long)path, name, value, size);
}
long fgetxattr(int fd, const char *name, void *value, unsigned long size) { return get(2, fd, name, value, size); }
int setxattr(const char *path, const char *name, const void *value, unsigned long size, int flags) {
    return (int)set(0, (long)path, name, value, size, flags);
}
int lsetxattr(const char *path, const char *name, const void *value, unsigned long size, int flags) {
    return (int)set(1, (long)path, name, value, size, flags);
}
int fsetxattr(int fd, const char *name, const void *value, unsigned long size, int flags) {
    return (int)set(2, fd, name, value, size, flags);
}
long listxattr(const char *path, char *names, unsigned long size) { return list(0, (long)path, names, size); }
long llistxattr(const char *path, char *names, unsigned long size) { return list(1, (long)path, names, size); }
long flistxattr(int fd, char *names, unsigned long size) { return list(2, fd, names, size); }
int removexattr(const char *path, const char *name) { return (int)unset(0, (long)path, name); }
int lremovexattr(const char *path, const char *name) { return (int)unset(1, (long)path, name); }
int fremovexattr(int fd, const char *name) { return (int)unset(2, fd, name); }
"""
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
""" + XATTRS_SOURCE_TEMPLATE.replace(b"@SOCKET@", XATTR_SOCKET.encode()).replace(b"@STORE@", METADATA_STORE.encode())
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
