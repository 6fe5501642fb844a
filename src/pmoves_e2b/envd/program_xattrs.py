"""A program's own ``user.*`` xattr calls, answered from envd's store the way Linux answers them.

Where the file system refuses user xattrs (gVisor's root in runsc 20221219), the gvisor tier's
preload shim (sandbox/backends/gvisor/shim.py) turns a program's ENOTSUP for a ``user.`` name (and
every listing there, which that gofer answers empty) into a request on envd's socket
(xattr_socket.py), with the file as an fd: O_PATH from the program's own lookup of the path
(O_NOFOLLOW for the l* calls) or the program's own fd for the f* ones, so envd resolves no path the
program names and follows no link. The answer comes from metadata_store.py, the store envd's file
metadata uses (E2B's metadata is the ``user.e2b.`` subset), so an SDK write is seen by a program's
getxattr and a program's setxattr by the SDK's get_info.

Linux's rules (fs/xattr.c), in its order, against the caller's credentials from the kernel
(SCM_CREDENTIALS, see xattr_socket.py, then /proc/<pid>/status for its fs ids, groups and
capabilities): flags other than
XATTR_CREATE/REPLACE are EINVAL; an empty name or one of 256 bytes or more ERANGE, a value over 64 KiB E2BIG;
a name that is only ``user.`` EINVAL. Only regular files and directories have user xattrs: get on
anything else is ENODATA, set and remove EPERM, a listing empty; in a sticky directory only its owner
(or CAP_FOWNER) sets or removes; then read permission to get, write permission to set or remove
(CAP_DAC_OVERRIDE passes both, CAP_DAC_READ_SEARCH reads) else EACCES, EROFS on a read-only mount.
A listing needs no permission on the file, as on Linux. XATTR_CREATE of a present name is EEXIST,
XATTR_REPLACE or a remove of a missing one ENODATA; a size-0 get or listing answers the size, a
smaller buffer ERANGE. The store holds 64 KiB of names and values per file, ENOSPC beyond (ext4 holds
less, tmpfs more). The store keys a file by path: a file removed while open has none, so it lists
nothing and a set there is ENOTSUP, as before.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from dataclasses import dataclass

from . import metadata_store

GET, SET, LIST, REMOVE = 1, 2, 3, 4
XATTR_CREATE, XATTR_REPLACE = 1, 2
SIZE_QUERY = 1  # a get's or a listing's flag: the caller's size was 0, it asks for the size
NAME_MAX = 255  # XATTR_NAME_MAX
SIZE_MAX = 65536  # XATTR_SIZE_MAX and XATTR_LIST_MAX
STORED_MAX = 65536  # names (with their NULs) and values of one file in the store
USER_PREFIX = b"user."
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER = 1, 2, 3
MAY_READ, MAY_WRITE = 4, 2

# op, flags, size (a set's value length; a get's or a listing's buffer), name length: the shim's layout
HEADER = struct.Struct("=IIII")


class XattrError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(errno.errorcode.get(code, str(code)))
        self.code = code


@dataclass(frozen=True)
class Request:
    op: int
    flags: int
    size: int
    name: bytes
    value: bytes

    @classmethod
    def parse(cls, message: bytes) -> Request:
        """A request as the shim sends it; anything else is EINVAL (a value too large, E2BIG)."""
        if len(message) < HEADER.size:
            raise XattrError(errno.EINVAL)
        op, flags, size, name_length = HEADER.unpack_from(message)
        name = message[HEADER.size : HEADER.size + name_length]
        value = message[HEADER.size + name_length :]
        if op not in (GET, SET, LIST, REMOVE) or len(name) != name_length:
            raise XattrError(errno.EINVAL)
        if op == SET:
            if flags & ~(XATTR_CREATE | XATTR_REPLACE):
                raise XattrError(errno.EINVAL)
            if size != len(value):
                raise XattrError(errno.EINVAL)
        elif value or flags & ~SIZE_QUERY:
            raise XattrError(errno.EINVAL)
        if op != LIST:
            if not name or len(name) > NAME_MAX or b"\0" in name:
                raise XattrError(errno.ERANGE)
            if op == SET and size > SIZE_MAX:
                raise XattrError(errno.E2BIG)
            if not name.startswith(USER_PREFIX):  # the shim asks only for user names
                raise XattrError(errno.ENOTSUP)
            if name == USER_PREFIX:
                raise XattrError(errno.EINVAL)
        return cls(op, flags, size, name, value)


@dataclass(frozen=True)
class Caller:
    """The credentials Linux checks a file's access with."""

    fsuid: int
    fsgid: int
    groups: frozenset[int]
    capabilities: int

    @classmethod
    def of_peer(cls, pid: int, uid: int, gid: int) -> Caller:
        """The process behind a connection: its fs ids, groups and effective capabilities, read
        only while its effective ids are still the ones the kernel gave for the connection."""
        try:
            with open(f"/proc/{pid}/status", encoding="utf-8", errors="replace") as status:
                fields = dict(line.partition(":")[::2] for line in status)
            uids, gids = fields["Uid"].split(), fields["Gid"].split()
            caller = cls(
                fsuid=int(uids[3]),
                fsgid=int(gids[3]),
                groups=frozenset(int(group) for group in fields.get("Groups", "").split()),
                capabilities=int(fields["CapEff"].strip(), 16),
            )
            same = int(uids[1]) == uid and int(gids[1]) == gid
        except (OSError, KeyError, IndexError, ValueError):
            same = False
        if not same:  # gone, or another process has the pid now
            raise XattrError(errno.EPERM)
        return caller

    def capable(self, capability: int) -> bool:
        return bool(self.capabilities >> capability & 1)

    def may(self, st: os.stat_result, want: int) -> bool:
        """Linux's generic_permission for ``want`` (MAY_READ or MAY_WRITE)."""
        if self.fsuid == st.st_uid:
            granted = st.st_mode >> 6
        elif st.st_gid == self.fsgid or st.st_gid in self.groups:
            granted = st.st_mode >> 3
        else:
            granted = st.st_mode
        if granted & want == want or self.capable(CAP_DAC_OVERRIDE):
            return True
        return want == MAY_READ and self.capable(CAP_DAC_READ_SEARCH)


def answer(request: Request, fd: int, caller: Caller) -> tuple[int, bytes]:
    """The call's result (a size, or 0) and the bytes to put in the caller's buffer; XattrError else."""
    st = os.fstat(fd)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        if request.op == LIST:
            return 0, b""
        raise XattrError(errno.ENODATA if request.op == GET else errno.EPERM)
    if request.op in (SET, REMOVE):
        _check_writable(fd, st, caller)
    elif request.op == GET and not caller.may(st, MAY_READ):
        raise XattrError(errno.EACCES)
    path = _path_of(fd, st)
    stored = metadata_store.read_at(fd, path) if path is not None else {}
    name = os.fsdecode(request.name)
    if request.op == GET:
        if name not in stored:
            raise XattrError(errno.ENODATA)
        return _fitted(stored[name], request)
    if request.op == LIST:
        return _fitted(b"".join(os.fsencode(listed) + b"\0" for listed in stored), request)
    if request.op == REMOVE:
        if name not in stored:
            raise XattrError(errno.ENODATA)
        del stored[name]
    else:
        if request.flags & XATTR_CREATE and name in stored:
            raise XattrError(errno.EEXIST)
        if request.flags & XATTR_REPLACE and name not in stored:
            raise XattrError(errno.ENODATA)
        stored[name] = request.value
        if sum(len(os.fsencode(key)) + 1 + len(value) for key, value in stored.items()) > STORED_MAX:
            raise XattrError(errno.ENOSPC)
    if path is None:  # removed while open (a remove found nothing before): the store keys by path
        raise XattrError(errno.ENOTSUP)
    metadata_store.write_at(fd, path, stored)
    return 0, b""


def _check_writable(fd: int, st: os.stat_result, caller: Caller) -> None:
    sticky_directory = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
    if sticky_directory and caller.fsuid != st.st_uid and not caller.capable(CAP_FOWNER):
        raise XattrError(errno.EPERM)
    if os.fstatvfs(fd).f_flag & os.ST_RDONLY:
        raise XattrError(errno.EROFS)
    if not caller.may(st, MAY_WRITE):
        raise XattrError(errno.EACCES)


def _path_of(fd: int, st: os.stat_result) -> str | None:
    """The path the file has now (envd's view of the fd), or None when it has none: removed, or
    moved between the look-up and the check (the store would be asked about another file)."""
    try:
        path = os.readlink(f"/proc/self/fd/{fd}")
        now = os.lstat(path)
    except OSError:
        return None
    if not path.startswith("/") or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
        return None
    return path


def _fitted(data: bytes, request: Request) -> tuple[int, bytes]:
    if request.flags & SIZE_QUERY:
        return len(data), b""
    if len(data) > min(request.size, SIZE_MAX):
        raise XattrError(errno.ERANGE)
    return len(data), data
