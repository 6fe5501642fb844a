"""The gVisor tier's backend (sandbox/backends/gvisor/) with the isolation agent as its envd:
what differs from ns (the sentry, not the host kernel, serves syscalls), what is the same (host
files, processes and ports out of reach; memory, pids, disk and CPU limits), nothing left behind."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from isolation.ns_harness import ID_PREFIX, Sandboxes, sandboxes_for_test
from isolation.test_ns_limits import agent_answers
from isolation.test_ns_network import assert_host_ports_closed
from leakcheck import ns_leftovers

from pmoves_e2b.sandbox.backends.base import TemplateImage
from pmoves_e2b.sandbox.backends.gvisor import GvisorBackend, runsc
from pmoves_e2b.sandbox.backends.ns.cgroups import SandboxCgroups

pytestmark = pytest.mark.skipif(runsc.probe() is not None, reason=f"gVisor unavailable: {runsc.probe()}")


def runsc_processes(root: Path) -> list[str]:
    """runsc processes (sandbox, gofer, stubs' parents) whose command line names ``root``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "runsc" in cmdline and str(root) in cmdline:
                found.append(f"process {entry}: {cmdline[:120]!r}")
    return found


@pytest.fixture(scope="module")
def gvisor_backend(runtime_dir: Path) -> Iterator[GvisorBackend]:
    backend = GvisorBackend(runtime_dir.parent / "sandboxes-gvisor")
    yield backend
    asyncio.run(backend.cleanup_orphans(set()))
    backend.close()
    left = ns_leftovers(
        backend.runtime_dir,
        backend.cgroup_parent_name,
        ID_PREFIX,
        set(),
        host_setup_mounts=(backend.runtime_dir, backend.launch_root),
    )
    assert not left + runsc_processes(backend.runtime_dir), left


@pytest.fixture()
def sandboxes(gvisor_backend: GvisorBackend, test_template: TemplateImage) -> Iterator[Sandboxes]:
    yield from sandboxes_for_test(gvisor_backend, test_template)
    assert runsc_processes(gvisor_backend.runtime_dir) == []


def test_syscalls_are_served_by_gvisor_not_the_host_kernel(sandboxes: Sandboxes) -> None:
    handle = sandboxes.create()
    assert handle.backend == "gvisor"
    version = sandboxes.run(handle, "/bin/cat", "/proc/version")["stdout"]
    assert version and version != Path("/proc/version").read_text(), version
    assert os.uname().release not in version
    dmesg = sandboxes.run(handle, "/bin/dmesg")
    assert dmesg["rc"] == 0 and "gVisor" in dmesg["stdout"], dmesg  # the sentry's log, not the host's ring
    # coreutils work (statx shim) and root inside is gVisor's root
    listing = sandboxes.run(handle, "/bin/ls", "-ld", "/etc", "/home/user")
    assert listing["rc"] == 0 and "user user" in listing["stdout"], listing
    # close_range(fd, ~0U, ...) as GLib's spawn calls it (through libc: the shim): closed, not EINVAL
    closed = sandboxes.python(
        handle,
        "import ctypes, os; libc = ctypes.CDLL(None, use_errno=True); fd = os.open('/dev/null', os.O_RDONLY); "
        "print(libc.close_range(fd, ctypes.c_uint(0xFFFFFFFF), 0), ctypes.get_errno(), os.path.exists(f'/proc/self/fd/{fd}'))",
    )
    assert closed["stdout"].split() == ["0", "0", "False"], closed


def test_export_keeps_the_owners_inside(sandboxes: Sandboxes, tmp_path: Path) -> None:
    handle = sandboxes.create()
    assert sandboxes.run(handle, "/bin/sh", "-c", "echo mine > /home/user/note", uid=1000)["rc"] == 0
    asyncio.run(sandboxes.backend.export_filesystem(handle, tmp_path / "layer"))
    note = tmp_path / "layer/home/user/note"
    assert note.read_text() == "mine\n" and (note.stat().st_uid, note.stat().st_gid) == (1000, 1000)


def test_host_files_processes_and_ports_are_out_of_reach(sandboxes: Sandboxes, tmp_path: Path) -> None:
    marker = tmp_path / "host-only-marker"
    marker.write_text("secret")
    handle = sandboxes.create()
    pids = sandboxes.python(handle, "import os; print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))")
    assert len(json.loads(pids["stdout"])) <= 5, pids  # init, the agent, this python: no host process
    ps = sandboxes.run(handle, "/bin/ps", "-e", "-o", "comm=")["stdout"]
    assert "pytest" not in ps and "runsc" not in ps, ps
    seen = sandboxes.python(handle, f"import os; print(os.path.exists({str(marker)!r}), os.path.exists('/work'))")
    assert seen["stdout"].split() == ["False", "False"], seen
    assert_host_ports_closed(sandboxes, handle)


def test_memory_limit_is_enforced(sandboxes: Sandboxes) -> None:
    handle = sandboxes.create(memory_mb=256)
    neighbour = sandboxes.create()
    # The host's memory cgroup holds the sentry, which owns all of the sandbox's memory: the OOM
    # killer ends the sentry, so the whole sandbox ends (under ns only the hog would). The rest of
    # the host, the neighbour included, carries on. The connection's other end was the sentry's
    # netstack: gone with it, it either said nothing more (timeout) or was reset.
    with pytest.raises((http.client.RemoteDisconnected, TimeoutError, ConnectionResetError)):
        sandboxes.python(handle, "x = b'x' * (600 * 1024 * 1024); print(len(x))", timeout=60)
    assert SandboxCgroups.from_dict(handle.details["cgroups"]).oom_kills() >= 1
    wait_until_dead(sandboxes, handle)
    assert agent_answers(neighbour)


def test_disk_limit_gives_enospc(sandboxes: Sandboxes) -> None:
    handle = sandboxes.create(disk_mb=32)
    fill = sandboxes.run(handle, "/bin/dd", "if=/dev/zero", "of=/home/user/fill", "bs=1M", "count=100", uid=1000)
    assert fill["rc"] != 0 and "No space left on device" in fill["stderr"], fill
    stats = asyncio.run(sandboxes.backend.stats(handle))
    assert stats.disk_total_bytes == 32 * 1024 * 1024 and stats.disk_used_bytes >= 30 * 1024 * 1024, stats
    assert sandboxes.run(handle, "/bin/rm", "/home/user/fill")["rc"] == 0
    assert sandboxes.run(handle, "/bin/sh", "-c", "echo ok > /home/user/ok")["rc"] == 0


def test_cpu_quota_throttles(sandboxes: Sandboxes) -> None:
    handle = sandboxes.create(cpu_count=0.2)
    cpu_dir = Path(handle.details["cgroups"]["cpu"])
    busy = sandboxes.python(handle, "import time\nend = time.time() + 1\nwhile time.time() < end: pass")
    assert busy["rc"] == 0, busy
    stat = dict(line.split() for line in (cpu_dir / "cpu.stat").read_text().splitlines())
    assert int(stat["nr_throttled"]) > 0, stat


def test_fork_bomb_is_refused_inside(sandboxes: Sandboxes) -> None:
    small = GvisorBackend(sandboxes.backend.runtime_dir, pids_max=32)
    handle = sandboxes.create(backend=small, memory_mb=1024)
    neighbour = sandboxes.create()
    bomb = """
import os, time
count = 0
try:
    while count < 5000:
        if os.fork() == 0:
            os.close(1)
            os.close(2)
            time.sleep(120)
            os._exit(0)
        count += 1
except OSError as exc:
    print(count, type(exc).__name__)
"""
    result = sandboxes.python(handle, bomb, uid=1000, timeout=60)
    count, error = result["stdout"].split()
    assert int(count) <= 32 and error == "BlockingIOError", result
    # gVisor refused the fork (RLIMIT_NPROC) before the host's pids.max, which would end the sandbox
    assert int(Path(handle.details["cgroups"]["pids"], "pids.events").read_text().split()[1]) == 0
    assert agent_answers(handle) and agent_answers(neighbour)


def wait_until_dead(sandboxes: Sandboxes, handle) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 10
    while asyncio.run(sandboxes.backend.is_alive(handle)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not asyncio.run(sandboxes.backend.is_alive(handle))
