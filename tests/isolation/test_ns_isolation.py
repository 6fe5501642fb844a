"""What a sandbox of the ns backend can and cannot see or do (real namespaces, as root)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from isolation.ns_harness import Sandboxes

from pmoves_e2b.sandbox.backends.ns.slots import UID_BASE, UID_RANGE

CAPS_DOCKER_DEFAULT = 0xA00405FB
SYSCALL_PROBE = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
for name, number in (("bpf", 321), ("keyctl", 250), ("io_uring_setup", 425), ("perf_event_open", 298), ("clone3", 435)):
    result = libc.syscall(number, 0, 0, 0, 0, 0)
    print(f"{name}:{ctypes.get_errno() if result == -1 else 'allowed'}")
"""


def _status(sandboxes: Sandboxes, handle, uid: int) -> dict[str, str]:
    out = sandboxes.run(handle, "/bin/cat", "/proc/self/status", uid=uid)["stdout"]
    return dict(line.split(":\t", 1) for line in out.splitlines() if ":\t" in line)


def test_sandbox_sees_only_its_own_processes_and_files(sandboxes: Sandboxes, tmp_path: Path) -> None:
    marker = tmp_path / "host-only-marker"
    marker.write_text("secret")
    handle = sandboxes.create()

    pids = sandboxes.python(handle, "import os; print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))")
    inside = json.loads(pids["stdout"])
    # pid 1 (bwrap's init), the agent, the python just started: nothing from the host
    assert 1 in inside and len(inside) <= 5, inside
    ps = sandboxes.run(handle, "/bin/ps", "-e", "-o", "comm=")["stdout"].split()
    assert "pytest" not in " ".join(ps) and "process_api" not in ps, ps

    seen = sandboxes.python(
        handle,
        f"import os; print(os.path.exists('/work'), os.path.exists({str(marker)!r}), os.path.exists('/run/netns'))",
    )["stdout"].split()
    assert seen == ["False", "False", "False"]
    # the sandbox's /root is the template's, not the host's
    template_root = set()
    for layer in sandboxes.template.layers:
        if Path(layer, "root").is_dir():
            template_root |= set(os.listdir(Path(layer, "root")))
    listing = sandboxes.python(handle, "import os, json; print(json.dumps(os.listdir('/root')))")
    inside_root = set(json.loads(listing["stdout"]))
    host_only = set(os.listdir("/root")) - template_root
    assert not inside_root & host_only, inside_root & host_only
    assert sandboxes.run(handle, "/bin/hostname")["stdout"].strip() != os.uname().nodename
    # its cgroup namespace starts at its own groups: no host cgroup paths are visible
    cgroup_lines = sandboxes.run(handle, "/bin/cat", "/proc/self/cgroup")["stdout"].splitlines()
    assert cgroup_lines and all(line.endswith(":/") for line in cgroup_lines), cgroup_lines


def test_root_inside_is_not_host_root(sandboxes: Sandboxes) -> None:
    handle = sandboxes.create()
    uid_base = handle.details["uid_base"]
    assert uid_base >= UID_BASE and (uid_base - UID_BASE) % UID_RANGE == 0

    # on the host every sandbox process runs under the mapped, unprivileged uid range
    cgroup_procs = Path(handle.details["cgroups"]["pids"], "cgroup.procs").read_text().split()
    host_uids = {int(Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[0]) for pid in cgroup_procs}
    assert host_uids and all(uid_base <= uid < uid_base + UID_RANGE for uid in host_uids), host_uids

    root = _status(sandboxes, handle, uid=0)
    assert root["Uid"].split()[0] == "0"
    assert int(root["CapEff"], 16) == CAPS_DOCKER_DEFAULT
    assert int(root["CapBnd"], 16) == CAPS_DOCKER_DEFAULT
    assert root["NoNewPrivs"] == "1" and root["Seccomp"] == "2"
    user = _status(sandboxes, handle, uid=1000)
    assert int(user["CapEff"], 16) == 0 and user["Uid"].split()[0] == "1000"
    # ... yet an ordinary user has what programs expect: POSIX shared memory, its home
    shm = sandboxes.python(handle, "import multiprocessing; multiprocessing.Lock(); print('ok')", uid=1000)
    assert shm["stdout"].strip() == "ok", shm

    # root inside may change its own rootfs ...
    assert sandboxes.run(handle, "/bin/sh", "-c", "echo 10.9.9.9 extra >> /etc/hosts")["rc"] == 0
    # ... but not the kernel, mounts or namespaces
    sysctl = sandboxes.run(handle, "/bin/sh", "-c", "echo sandbox > /proc/sys/kernel/hostname")
    assert sysctl["rc"] != 0
    mount = sandboxes.run(handle, "/bin/mount", "-t", "tmpfs", "none", "/mnt")
    assert mount["rc"] != 0, mount
    assert sandboxes.run(handle, "/bin/sh", "-c", "grep -c ' /mnt ' /proc/self/mounts")["stdout"].strip() == "0"
    unshare = sandboxes.run(handle, "/usr/bin/unshare", "-U", "-r", "/bin/true")
    assert unshare["rc"] != 0
    # the seccomp denylist: dangerous syscalls fail with EPERM, clone3 with ENOSYS (glibc falls back)
    syscalls = sandboxes.python(handle, SYSCALL_PROBE)["stdout"].split()
    assert syscalls == ["bpf:1", "keyctl:1", "io_uring_setup:1", "perf_event_open:1", "clone3:38"], syscalls
    threads = sandboxes.python(handle, "import threading; t = threading.Thread(target=print, args=('ok',)); t.start()")
    assert threads["stdout"].strip() == "ok"
    # the template (shared by every sandbox) is never written: the change lives in the upper layer
    for layer in sandboxes.template.layers:
        hosts = Path(layer, "etc/hosts")
        assert not hosts.exists() or "10.9.9.9" not in hosts.read_text()
    upper_hosts = Path(handle.details["runtime_dir"], "rw/u/etc/hosts")
    assert "10.9.9.9" in upper_hosts.read_text()
    assert upper_hosts.stat().st_uid == uid_base
