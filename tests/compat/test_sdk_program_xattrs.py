"""A program's own user xattrs in the sandbox, and E2B's file metadata through the stock SDK: one map.

On every tier (tests/conftest.py TIERED_MODULES). On ns they are the file system's; gVisor's root
refuses user xattrs (ENOTSUP, root too, in runsc 20221219), so there the preload shim asks envd's
store (envd/program_xattrs.py), and every errno a program sees must be the one Linux gives on ns.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from e2b import Sandbox

pytestmark = pytest.mark.stack

DIR = "/home/user/xattrs"

# Run as the program under test: call() gives a call's result or its errno's name; raw() calls libc
# with a size os.* never passes (0 asks for the size, a buffer too small is ERANGE).
HELPERS = """
import ctypes, errno, json, os, socket, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
def call(function, *args, **kwargs):
    try:
        done = function(*args, **kwargs)
    except OSError as exc:
        return errno.errorcode[exc.errno]
    if isinstance(done, list):
        return sorted(done)
    return done.decode() if isinstance(done, bytes) else done
def raw(name, *args):
    done = getattr(libc, name)(*args)
    return done if done >= 0 else errno.errorcode[ctypes.get_errno()]
results = {}
"""


def _run(sbx: Sandbox, script: str, user: str = "user") -> dict[str, Any]:
    sbx.files.write("/tmp/xattr_program.py", HELPERS + script + "\nprint(json.dumps(results))\n")
    result: dict[str, Any] = json.loads(sbx.commands.run("python3 /tmp/xattr_program.py", user=user).stdout)
    return result


@pytest.fixture()
def files(sbx: Sandbox) -> Any:
    sbx.commands.run(f"rm -rf {DIR} && mkdir {DIR}", user="root")
    sbx.commands.run(f"chown user:user {DIR}", user="root")
    yield
    sbx.commands.run(f"rm -rf {DIR}", user="root")


def test_a_program_sets_what_get_info_shows_and_sees_what_the_sdk_wrote(sbx: Sandbox, files: None) -> None:
    """E2B's own test_metadata_set_via_xattrs_surfaced_in_get_info, and the other way round, with
    set/get/list/remove by path and by fd and XATTR_CREATE/XATTR_REPLACE."""
    sbx.files.write(f"{DIR}/sdk.txt", "s", metadata={"from": "sdk"})
    sbx.files.write(f"{DIR}/own.txt", "o")
    got = _run(
        sbx,
        f"""
own, sdk = "{DIR}/own.txt", "{DIR}/sdk.txt"
results["set"] = call(os.setxattr, own, "user.e2b.author", b"mish")
results["set another"] = call(os.setxattr, own, "user.note", b"first")
results["get the sdk's"] = call(os.getxattr, sdk, "user.e2b.from")
results["list the sdk's"] = call(os.listxattr, sdk)
results["create a present one"] = call(os.setxattr, own, "user.note", b"x", os.XATTR_CREATE)
results["replace a missing one"] = call(os.setxattr, own, "user.missing", b"x", os.XATTR_REPLACE)
results["replace"] = call(os.setxattr, own, "user.note", b"second", os.XATTR_REPLACE)
results["get replaced"] = call(os.getxattr, own, "user.note")
results["create"] = call(os.setxattr, own, "user.made", b"", os.XATTR_CREATE)
results["get empty"] = call(os.getxattr, own, "user.made")
results["remove"] = call(os.removexattr, own, "user.made")
results["remove again"] = call(os.removexattr, own, "user.made")
results["get removed"] = call(os.getxattr, own, "user.made")
results["list"] = call(os.listxattr, own)
fd = os.open(own, os.O_RDONLY)
results["fset"] = call(os.setxattr, fd, "user.e2b.by-fd", b"yes")
results["fget"] = call(os.getxattr, fd, "user.e2b.by-fd")
results["flist"] = call(os.listxattr, fd)
results["fremove"] = call(os.removexattr, fd, "user.e2b.by-fd")
""",
    )
    assert got == {
        "set": None,
        "set another": None,
        "get the sdk's": "sdk",
        "list the sdk's": ["user.e2b.from"],
        "create a present one": "EEXIST",
        "replace a missing one": "ENODATA",
        "replace": None,
        "get replaced": "second",
        "create": None,
        "get empty": "",
        "remove": None,
        "remove again": "ENODATA",
        "get removed": "ENODATA",
        "list": ["user.e2b.author", "user.note"],
        "fset": None,
        "fget": "yes",
        "flist": ["user.e2b.author", "user.e2b.by-fd", "user.note"],
        "fremove": None,
    }
    assert sbx.files.get_info(f"{DIR}/own.txt").metadata == {"author": "mish"}
    listed = {entry.name: entry.metadata for entry in sbx.files.list(DIR)}
    assert listed == {"own.txt": {"author": "mish"}, "sdk.txt": {"from": "sdk"}}
    # the SDK's metadata of a directory, read by a program
    sbx.files.make_dir(f"{DIR}/sub")
    got = _run(sbx, f'results["dir"] = call(os.setxattr, "{DIR}/sub", "user.e2b.kind", b"folder")')
    assert got == {"dir": None}
    assert sbx.files.get_info(f"{DIR}/sub").metadata == {"kind": "folder"}
    assert _run(sbx, f'results["removed"] = call(os.removexattr, "{DIR}/own.txt", "user.e2b.author")') == {
        "removed": None
    }
    assert sbx.files.get_info(f"{DIR}/own.txt").metadata is None


def test_who_may_get_set_and_list_is_linuxs_rule(sbx: Sandbox, files: None) -> None:
    """Read permission to get, write permission to set or remove (the owner of a read-only file
    too is refused), none to list; a sticky directory only its owner; root past the modes."""
    root_setup = _run(
        sbx,
        f"""
for name, mode in (("public", 0o644), ("secret", 0o600), ("shared", 0o664)):
    path = "{DIR}/" + name
    open(path, "w").close()
    os.chmod(path, mode)
    results[name] = call(os.setxattr, path, "user.e2b.owner", b"root")
os.chown("{DIR}/shared", 0, 1000)
os.mkdir("{DIR}/sticky")
os.chmod("{DIR}/sticky", 0o1777)
open("{DIR}/readonly", "w").close()
os.chown("{DIR}/readonly", 1000, 1000)
os.chmod("{DIR}/readonly", 0o444)
""",
        user="root",
    )
    assert root_setup == {"public": None, "secret": None, "shared": None}
    got = _run(
        sbx,
        f"""
d = "{DIR}/"
results["get readable"] = call(os.getxattr, d + "public", "user.e2b.owner")
results["set not writable"] = call(os.setxattr, d + "public", "user.e2b.owner", b"user")
results["remove not writable"] = call(os.removexattr, d + "public", "user.e2b.owner")
results["get not readable"] = call(os.getxattr, d + "secret", "user.e2b.owner")
results["list not readable"] = call(os.listxattr, d + "secret")
results["set by group"] = call(os.setxattr, d + "shared", "user.e2b.owner", b"group")
results["set own read-only"] = call(os.setxattr, d + "readonly", "user.e2b.x", b"1")
results["set sticky not owned"] = call(os.setxattr, d + "sticky", "user.e2b.x", b"1")
results["get unreadable"] = call(os.getxattr, d + "secret", "user.e2b.none")
""",
    )
    assert got == {
        "get readable": "root",
        "set not writable": "EACCES",
        "remove not writable": "EACCES",
        "get not readable": "EACCES",
        "list not readable": ["user.e2b.owner"],
        "set by group": None,
        "set own read-only": "EACCES",
        "set sticky not owned": "EPERM",
        "get unreadable": "EACCES",
    }
    as_root = _run(
        sbx,
        f"""
results["root sets a read-only file"] = call(os.setxattr, "{DIR}/readonly", "user.e2b.x", b"root")
results["root sets the sticky dir"] = call(os.setxattr, "{DIR}/sticky", "user.e2b.x", b"root")
""",
        user="root",
    )
    assert as_root == {"root sets a read-only file": None, "root sets the sticky dir": None}
    assert sbx.files.get_info(f"{DIR}/public").metadata == {"owner": "root"}
    assert sbx.files.get_info(f"{DIR}/shared").metadata == {"owner": "group"}


def test_links_and_special_files_have_no_user_xattrs(sbx: Sandbox, files: None) -> None:
    """The l* calls act on the link itself (EPERM to set, nothing to get or list), the others on its
    target; a FIFO has none either; a dangling link is ENOENT."""
    sbx.files.write(f"{DIR}/target", "t")
    got = _run(
        sbx,
        f"""
d = "{DIR}/"
os.symlink(d + "target", d + "link")
os.symlink(d + "nowhere", d + "dangling")
os.mkfifo(d + "fifo")
results["set through the link"] = call(os.setxattr, d + "link", "user.e2b.via", b"link")
results["get of the target"] = call(os.getxattr, d + "target", "user.e2b.via")
results["lget of the target"] = call(os.getxattr, d + "target", "user.e2b.via", follow_symlinks=False)
results["lset"] = call(os.setxattr, d + "link", "user.e2b.own", b"1", follow_symlinks=False)
results["lget"] = call(os.getxattr, d + "link", "user.e2b.via", follow_symlinks=False)
results["llist"] = call(os.listxattr, d + "link", follow_symlinks=False)
results["lremove"] = call(os.removexattr, d + "link", "user.e2b.via", follow_symlinks=False)
results["list through the link"] = call(os.listxattr, d + "link")
results["set dangling"] = call(os.setxattr, d + "dangling", "user.e2b.x", b"1")
results["lset dangling"] = call(os.setxattr, d + "dangling", "user.e2b.x", b"1", follow_symlinks=False)
results["set fifo"] = call(os.setxattr, d + "fifo", "user.e2b.x", b"1")
results["get fifo"] = call(os.getxattr, d + "fifo", "user.e2b.x")
results["list fifo"] = call(os.listxattr, d + "fifo")
""",
    )
    assert got == {
        "set through the link": None,
        "get of the target": "link",
        "lget of the target": "link",
        "lset": "EPERM",
        "lget": "ENODATA",
        "llist": [],
        "lremove": "EPERM",
        "list through the link": ["user.e2b.via"],
        "set dangling": "ENOENT",
        "lset dangling": "EPERM",
        "set fifo": "EPERM",
        "get fifo": "ENODATA",
        "list fifo": [],
    }
    assert sbx.files.get_info(f"{DIR}/target").metadata == {"via": "link"}


def test_sizes_and_names_get_linuxs_errnos(sbx: Sandbox, files: None) -> None:
    """A size-0 call answers the size, a smaller buffer is ERANGE, a value over 64 KiB E2BIG, a name
    empty or over 255 bytes ERANGE, unknown flags EINVAL."""
    sbx.files.write(f"{DIR}/f", "f")
    longest = "user." + "n" * 250
    got = _run(
        sbx,
        f"""
f = b"{DIR}/f"
results["set"] = call(os.setxattr, f, "user.e2b.author", b"mish")
results["size query"] = raw("getxattr", f, b"user.e2b.author", None, 0)
buffer = ctypes.create_string_buffer(16)
results["too small"] = raw("getxattr", f, b"user.e2b.author", buffer, 3)
results["exact"] = raw("getxattr", f, b"user.e2b.author", buffer, 4)
results["exact bytes"] = buffer.raw[:4].decode()
results["list size query"] = raw("listxattr", f, None, 0)
results["list too small"] = raw("listxattr", f, buffer, 5)
results["flist size query"] = raw("flistxattr", os.open(f, os.O_RDONLY), None, 0)
results["value too large"] = call(os.setxattr, f, "user.e2b.big", b"x" * 65537)
results["name too long"] = call(os.setxattr, f, "user." + "n" * 251, b"x")
results["empty name"] = call(os.getxattr, f, "")
results["unknown flags"] = call(os.setxattr, f, "user.e2b.x", b"x", 4)
results["longest name"] = call(os.setxattr, f, "{longest}", b"long")
results["get longest"] = call(os.getxattr, f, "{longest}")
""",
    )
    assert got == {
        "set": None,
        "size query": 4,
        "too small": "ERANGE",
        "exact": 4,
        "exact bytes": "mish",
        "list size query": len(b"user.e2b.author\0"),
        "list too small": "ERANGE",
        "flist size query": len(b"user.e2b.author\0"),
        "value too large": "E2BIG",
        "name too long": "ERANGE",
        "empty name": "ERANGE",
        "unknown flags": "EINVAL",
        "longest name": None,
        "get longest": "long",
    }


def test_envd_answers_a_bad_request_with_an_errno_and_keeps_serving(sbx: Sandbox, files: None, tier: str) -> None:
    """The socket the shim asks (gVisor only: elsewhere programs have the file system's xattrs): a
    request it cannot take is an errno, a silent connection holds up no other, and the caller's
    credentials are its own (this runsc's SO_PEERCRED names envd itself, so they come as
    SCM_CREDENTIALS, which the kernel refuses to forge)."""
    if tier != "gvisor":
        pytest.skip("envd serves programs' xattrs only where the root file system refuses them")
    sbx.commands.run(f"touch {DIR}/secret && chmod 600 {DIR}/secret && chown root {DIR}/secret", user="root")
    sbx.files.write(f"{DIR}/mine", "m")
    got = _run(
        sbx,
        f"""
GET, SET = 1, 2
OWN = (os.getpid(), os.geteuid(), os.getegid())
def ask(message, fds=(), credentials=OWN):
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.connect("/run/pmoves/xattr.sock")
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{{len(fds)}}i", *fds))] if fds else []
        if credentials:
            ancillary.append((socket.SOL_SOCKET, socket.SCM_CREDENTIALS, struct.pack("3i", *credentials)))
        try:
            sock.sendmsg([message], ancillary)
        except OSError as exc:
            return "refused to send: " + errno.errorcode[exc.errno]
        reply = sock.recv(70000)
    result = struct.unpack("=i", reply[:4])[0] if len(reply) >= 4 else None
    return errno.errorcode[-result] if result is not None and result < 0 else [result, reply[4:].decode()]
def request(op, name, value=b"", size=0, flags=0):
    return struct.pack("=IIII", op, flags, size if op != SET else len(value), len(name)) + name + value
mine = os.open("{DIR}/mine", os.O_RDONLY)
secret = os.open("{DIR}/secret", os.O_PATH)
idle = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
idle.connect("/run/pmoves/xattr.sock")
results["short"] = ask(b"abc", [mine])
results["no fd"] = ask(request(SET, b"user.e2b.a", b"1"))
results["two fds"] = ask(request(SET, b"user.e2b.a", b"1"), [mine, mine])
results["unknown op"] = ask(struct.pack("=IIII", 9, 0, 0, 0), [mine])
results["name longer than sent"] = ask(struct.pack("=IIII", GET, 0, 8, 200) + b"user.e2b", [mine])
results["value size not sent"] = ask(struct.pack("=IIII", SET, 0, 5, 8) + b"user.e2b", [mine])
results["not a user name"] = ask(request(SET, b"trusted.a", b"1"), [mine])
results["set secret"] = ask(request(SET, b"user.e2b.a", b"1"), [secret])
results["get secret"] = ask(request(GET, b"user.e2b.a", size=10), [secret])
results["set mine"] = ask(request(SET, b"user.e2b.a", b"1"), [mine])
results["get mine"] = ask(request(GET, b"user.e2b.a", size=10), [mine])
results["as root"] = ask(request(SET, b"user.e2b.a", b"1"), [secret], (1, 0, 0))
results["as my uid, root's pid"] = ask(request(SET, b"user.e2b.a", b"1"), [secret], (1, OWN[1], OWN[2]))
results["without credentials"] = ask(request(SET, b"user.e2b.a", b"1"), [secret], None)
results["pipe"] = ask(request(SET, b"user.e2b.a", b"1"), [os.pipe()[0]])
idle.close()
""",
    )
    assert got == {
        "short": "EINVAL",
        "no fd": "EINVAL",
        "two fds": "EINVAL",
        "unknown op": "EINVAL",
        "name longer than sent": "EINVAL",
        "value size not sent": "EINVAL",
        "not a user name": "ENOTSUP",
        "set secret": "EACCES",
        "get secret": "EACCES",
        "set mine": [0, ""],
        "get mine": [1, "1"],
        "as root": "refused to send: EPERM",
        "as my uid, root's pid": "refused to send: EPERM",
        "without credentials": got["without credentials"],
        "pipe": "EPERM",
    }
    assert got["without credentials"] in ("EPERM", "EACCES")  # none, or the kernel's own
    assert sbx.files.get_info(f"{DIR}/mine").metadata == {"a": "1"}
    assert sbx.files.get_info(f"{DIR}/secret").metadata is None


def test_xattrs_work_on_after_a_pause(running_stack: Any) -> None:
    """gVisor's pause checkpoints the sandbox (envd's socket with it) and restores it."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in running_stack.sdk_env.items():
            patch.setenv(name, value)
        box = Sandbox.create(timeout=300)
        try:
            box.files.write("/home/user/kept.txt", "k")
            assert _run(box, 'results["set"] = call(os.setxattr, "/home/user/kept.txt", "user.e2b.a", b"1")') == {
                "set": None
            }
            box.pause()
            again = Sandbox.connect(box.sandbox_id, timeout=300)
            got = _run(
                again,
                """
results["get"] = call(os.getxattr, "/home/user/kept.txt", "user.e2b.a")
results["set"] = call(os.setxattr, "/home/user/kept.txt", "user.e2b.b", b"2")
""",
            )
            assert got == {"get": "1", "set": None}
            assert again.files.get_info("/home/user/kept.txt").metadata == {"a": "1", "b": "2"}
        finally:
            Sandbox.kill(box.sandbox_id)
