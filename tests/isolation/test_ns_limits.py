"""Resource limits of ns sandboxes: memory, pids and disk are contained inside the sandbox."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from pathlib import Path

from isolation.ns_harness import Sandboxes

from pmoves_e2b.sandbox.backends.base import ENVD_PORT
from pmoves_e2b.sandbox.backends.ns import NsBackend
from pmoves_e2b.sandbox.backends.ns.cgroups import SandboxCgroups


def agent_answers(handle) -> bool:
    with socket.create_connection((handle.address, ENVD_PORT), timeout=5):
        return True


def test_memory_limit_kills_inside_only(sandboxes: Sandboxes) -> None:
    handle = sandboxes.create(memory_mb=128)
    neighbour = sandboxes.create()
    hog = sandboxes.python(handle, "x = b'x' * (400 * 1024 * 1024); print(len(x))")
    assert hog["rc"] == -9, hog  # SIGKILL by the OOM killer of the sandbox's memory cgroup
    assert SandboxCgroups.from_dict(handle.details["cgroups"]).oom_kills() >= 1
    # the sandbox itself, its neighbour and the host carry on
    assert agent_answers(handle) and agent_answers(neighbour)
    fits = sandboxes.python(handle, "x = b'x' * (40 * 1024 * 1024); print(len(x))")
    assert fits["rc"] == 0 and fits["stdout"].strip() == str(40 * 1024 * 1024)


def test_fork_bomb_is_contained(sandboxes: Sandboxes) -> None:
    small = NsBackend(sandboxes.backend.runtime_dir, pids_max=64)
    handle = sandboxes.create(backend=small)
    bomb = """
import os, signal, time
children = []
try:
    while len(children) < 1000:
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        children.append(pid)
except OSError as exc:
    print(len(children), type(exc).__name__)
for pid in children:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
"""
    result = sandboxes.python(handle, bomb, uid=1000)
    count, error = result["stdout"].split()
    assert int(count) < 64 and error == "BlockingIOError", result
    events = Path(handle.details["cgroups"]["pids"], "pids.events").read_text()
    assert int(events.split()[1]) >= 1
    assert agent_answers(handle)
    assert sandboxes.run(handle, "/bin/true")["rc"] == 0


def test_disk_limit_gives_enospc(sandboxes: Sandboxes) -> None:
    handle = sandboxes.create(disk_mb=32)
    fill = sandboxes.run(handle, "/bin/dd", "if=/dev/zero", "of=/home/user/fill", "bs=1M", "count=100", uid=1000)
    assert fill["rc"] != 0 and "No space left on device" in fill["stderr"], fill
    stats = asyncio.run(sandboxes.backend.stats(handle))
    assert stats.disk_total_bytes == 32 * 1024 * 1024
    assert stats.disk_used_bytes >= 30 * 1024 * 1024
    # the host's disk is untouched: the upper layer is the sandbox's own tmpfs
    assert sandboxes.run(handle, "/bin/rm", "/home/user/fill")["rc"] == 0
    assert sandboxes.run(handle, "/bin/sh", "-c", "echo ok > /tmp/ok")["rc"] == 0


def test_each_sandbox_gets_a_fresh_disk(sandboxes: Sandboxes) -> None:
    """Disks are copies of one blank file system made ahead: nothing one sandbox wrote is on the
    next one's disk, which has its whole size free, and each disk's loop device goes with it."""
    first = sandboxes.create(disk_mb=64)
    wrote = sandboxes.run(first, "/bin/dd", "if=/dev/urandom", "of=/home/user/secret", "bs=1M", "count=20", uid=1000)
    assert wrote["rc"] == 0, wrote
    second = sandboxes.create(disk_mb=64)
    image = Path(first.details["runtime_dir"], "disk.img")
    sandboxes.destroy(first)
    assert not image.exists()
    assert not [p for p in Path("/sys/block").glob("loop*/loop/backing_file") if str(image) in p.read_text()]
    third = sandboxes.create(disk_mb=64)
    for handle in (second, third):
        assert sandboxes.run(handle, "/bin/ls", "/home/user/secret")["rc"] != 0
        stats = asyncio.run(sandboxes.backend.stats(handle))
        assert stats.disk_total_bytes == 64 * 1024 * 1024
        assert stats.disk_used_bytes < 8 * 1024 * 1024, stats
        fill = sandboxes.run(handle, "/bin/dd", "if=/dev/zero", "of=/home/user/f", "bs=1M", "count=48", uid=1000)
        assert fill["rc"] == 0, fill


def _loop_bound_to(image: Path) -> list[str]:
    bound = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            if backing.read_text().strip().removesuffix(" (deleted)") == str(image):
                bound.append(backing.parent.parent.name)
        except OSError:
            pass  # detached meanwhile
    return bound


def test_destroy_returns_once_the_disk_is_detached(sandboxes: Sandboxes) -> None:
    """The unmount can return before the kernel lets go of the disk (here a host process still has a
    file of it open; after a sandbox's end it is a kernel worker's last put of its mount namespace):
    destroy waits for the loop device's release, so nothing of the sandbox is left when it returns."""
    handle = sandboxes.create(disk_mb=32)
    sandbox_dir = Path(handle.details["runtime_dir"])
    image, disk = sandbox_dir / "disk.img", sandbox_dir / "rw"
    assert _loop_bound_to(image)
    holder = os.open(disk / "envd.log", os.O_RDONLY)
    left_at_return: list[str] = []

    def destroy() -> None:
        sandboxes.destroy(handle)
        left_at_return.extend(_loop_bound_to(image))

    destroyer = threading.Thread(target=destroy)
    try:
        destroyer.start()
        while os.path.ismount(disk) and destroyer.is_alive():
            time.sleep(0.01)
        time.sleep(0.3)  # destroy would have returned by now if it did not wait for the device
        assert destroyer.is_alive()
    finally:
        os.close(holder)
        destroyer.join(timeout=30)
    assert not destroyer.is_alive() and left_at_return == []
    assert not image.exists() and not _loop_bound_to(image)


def test_cpu_quota_throttles(sandboxes: Sandboxes) -> None:
    handle = sandboxes.create(cpu_count=0.2)
    cpu_dir = Path(handle.details["cgroups"]["cpu"])
    assert (cpu_dir / "cpu.cfs_quota_us").read_text().strip() == "20000"
    busy = sandboxes.python(handle, "import time\nend = time.time() + 0.5\nwhile time.time() < end: pass")
    assert busy["rc"] == 0
    stat = dict(line.split() for line in (cpu_dir / "cpu.stat").read_text().splitlines())
    assert int(stat["nr_throttled"]) > 0, stat


def test_filling_the_disk_is_enospc_not_an_oom(sandboxes: Sandboxes) -> None:
    """The disk has its own limit: a disk larger than the memory limit fills up to ENOSPC for the
    writer, and nothing is OOM-killed (the upper layer is not charged to the memory cgroup)."""
    handle = sandboxes.create(memory_mb=128, disk_mb=512)
    fill = sandboxes.run(
        handle, "/bin/dd", "if=/dev/zero", "of=/home/user/fill", "bs=1M", "count=700", uid=1000, timeout=120
    )
    assert fill["rc"] != 0 and "No space left on device" in fill["stderr"], fill
    cg = SandboxCgroups.from_dict(handle.details["cgroups"])
    assert cg.oom_kills() == 0
    assert agent_answers(handle)
    stats = asyncio.run(sandboxes.backend.stats(handle))
    assert stats.disk_used_bytes >= 400 * 1024 * 1024 and stats.disk_total_bytes >= 480 * 1024 * 1024, stats
    used, _ = cg.memory_usage()
    assert used < 128 * 1024 * 1024
    assert sandboxes.run(handle, "/bin/rm", "/home/user/fill")["rc"] == 0
