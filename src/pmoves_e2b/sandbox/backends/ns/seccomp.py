"""The seccomp denylist every sandbox runs under, compiled to BPF for ``bwrap --seccomp FD``.

The rules follow Docker's default spirit as a denylist (see
reference/isolation-on-this-machine.md): kernel-level knobs, module loading, keyrings, bpf,
perf, userfaultfd, io_uring, every mount API and every way to make new namespaces fail with
EPERM. ``clone3`` fails with ENOSYS so that glibc falls back to ``clone``, whose namespace
flags are filtered by argument (seccomp cannot look into clone3's struct).
"""

from __future__ import annotations

import errno
import functools
import os

import pyseccomp

DENIED_SYSCALLS: tuple[str, ...] = (
    "add_key", "request_key", "keyctl", "bpf", "perf_event_open", "userfaultfd", "fanotify_init",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot",
    "swapon", "swapoff", "acct", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
    "syslog", "quotactl", "quotactl_fd", "lookup_dcookie", "vhangup", "iopl", "ioperm",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "mount", "umount2", "pivot_root",
    "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr",
    "unshare", "setns", "open_by_handle_at", "name_to_handle_at", "uselib", "nfsservctl",
    "_sysctl", "ustat", "sysfs",
)  # fmt: skip

# CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET
NAMESPACE_CLONE_FLAGS: tuple[int, ...] = (
    0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000,
)  # fmt: skip

ARCHITECTURES = (pyseccomp.Arch.X86_64, pyseccomp.Arch.X86, pyseccomp.Arch.X32)


def _add_rule_if_known(filt: pyseccomp.SyscallFilter, action: int, name: str, *args: pyseccomp.Arg) -> None:
    try:
        filt.add_rule(action, name, *args)
    except (OSError, ValueError, RuntimeError):
        # A syscall this libseccomp does not know for some architecture cannot be called there either.
        pass


@functools.cache
def denylist_bpf() -> bytes:
    """The compiled filter (built once per process, about 2 ms)."""
    filt = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    for arch in ARCHITECTURES:
        if not filt.exist_arch(arch):
            filt.add_arch(arch)
    eperm = pyseccomp.ERRNO(errno.EPERM)
    for name in DENIED_SYSCALLS:
        _add_rule_if_known(filt, eperm, name)
    _add_rule_if_known(filt, pyseccomp.ERRNO(errno.ENOSYS), "clone3")
    for flag in NAMESPACE_CLONE_FLAGS:
        _add_rule_if_known(filt, eperm, "clone", pyseccomp.Arg(0, pyseccomp.MASKED_EQ, flag, flag))
    fd = os.memfd_create("seccomp-bpf", os.MFD_CLOEXEC)
    try:
        with os.fdopen(os.dup(fd), "wb") as out:
            filt.export_bpf(out)
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def bpf_pipe() -> int:
    """A pipe read end that yields the filter once (for ``bwrap --seccomp FD``); caller closes it."""
    program = denylist_bpf()
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, program)  # well under the 64 KiB pipe buffer
    finally:
        os.close(write_end)
    return read_end
