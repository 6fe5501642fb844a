"""Lifecycle of ns sandboxes: pause/resume, survival of the creating process, re-adoption,
orphan cleanup, stats and clean failures."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from isolation.ns_harness import Sandboxes

from pmoves_e2b.sandbox.backends.base import ENVD_PORT, BackendError, SandboxHandle, TemplateImage
from pmoves_e2b.sandbox.backends.ns import NsBackend, cgroups

COUNTER = (
    "import time\n"
    "n = 0\n"
    "while True:\n"
    "    n += 1\n"
    "    open('/tmp/counter.tmp', 'w').write(str(n))\n"
    "    __import__('os').replace('/tmp/counter.tmp', '/tmp/counter')\n"
    "    time.sleep(0.01)\n"
)


def wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def test_pause_freezes_and_resume_thaws(sandboxes: Sandboxes) -> None:
    handle = sandboxes.create()
    started = sandboxes.run(handle, "/bin/sh", "-c", f'/usr/bin/python3 -c "{COUNTER}" </dev/null >/dev/null 2>&1 &')
    assert started["rc"] == 0, started
    counter = Path(handle.details["runtime_dir"], "rw/u/tmp/counter")  # the upper layer, seen from the host

    def value() -> int:
        try:
            return int(counter.read_text() or 0)
        except FileNotFoundError:
            return 0

    assert wait_for(lambda: value() > 3)
    backend = sandboxes.backend
    asyncio.run(backend.pause(handle))
    assert handle.state == "paused"
    frozen_at = value()
    time.sleep(0.3)  # an observation window, not a synchronisation
    assert value() == frozen_at
    assert asyncio.run(backend.is_alive(handle))
    asyncio.run(backend.resume(handle))
    assert handle.state == "running"
    assert wait_for(lambda: value() > frozen_at + 3)


def test_destroy_of_a_paused_sandbox_leaves_nothing(sandboxes: Sandboxes) -> None:
    handle = sandboxes.create()
    asyncio.run(sandboxes.backend.pause(handle))
    sandboxes.destroy(handle)
    assert not asyncio.run(sandboxes.backend.is_alive(handle))


CREATOR = """
import asyncio, json, os, sys, time
from pathlib import Path
# run like a service that lives in another memory cgroup than the one cleaning up later
Path(sys.argv[2], "cgroup.procs").write_text(str(os.getpid()))
from pmoves_e2b.sandbox.backends.base import SandboxSpec, TemplateImage
from pmoves_e2b.sandbox.backends.ns import NsBackend
args = json.loads(sys.argv[1])
spec = SandboxSpec(**{**args["spec"], "template": TemplateImage(**args["template"])})
handle = asyncio.run(NsBackend(Path(args["runtime_dir"])).create(spec))
print(json.dumps(handle.to_dict()), flush=True)
time.sleep(600)
"""


def test_sandbox_survives_sigkill_of_its_creator_and_is_adopted(sandboxes: Sandboxes) -> None:
    spec = sandboxes.spec()
    template = dataclasses.asdict(spec.template)
    payload = {
        "runtime_dir": str(sandboxes.backend.runtime_dir),
        "spec": {k: v for k, v in dataclasses.asdict(spec).items() if k != "template"},
        "template": {**template, "layers": list(template["layers"])},
    }
    own_memory = cgroups.parent_dirs("x")["memory"].parent
    other_memory = own_memory / f"e2b-test-other-memcg-{os.getpid()}"
    other_memory.mkdir()
    creator = subprocess.Popen(
        [sys.executable, "-c", CREATOR, json.dumps(payload), str(other_memory)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        line = creator.stdout.readline()
        assert line, creator.stderr.read().decode()
        handle = SandboxHandle.from_dict(json.loads(line))
        sandboxes.track(handle)
    finally:
        creator.send_signal(signal.SIGKILL)
        creator.wait(timeout=10)
        creator.stdout.close()
        creator.stderr.close()

    # a new backend instance (a restarted service) finds it alive and working
    adopter = NsBackend(sandboxes.backend.runtime_dir)
    assert asyncio.run(adopter.is_alive(handle))
    assert sandboxes.run(handle, "/bin/echo", "still here")["stdout"].strip() == "still here"
    assert Path(handle.details["cgroups"]["memory"]).is_relative_to(other_memory)
    asyncio.run(adopter.destroy(handle))
    assert not asyncio.run(adopter.is_alive(handle))
    adopter.close()  # it may keep the sandbox's netns for its next one
    # close() finds the parent group the creator made in its own memory cgroup
    sandboxes.backend.close()
    left = [path for path in other_memory.iterdir() if path.is_dir()]
    for path in left:
        path.rmdir()
    other_memory.rmdir()
    assert left == []


def test_cleanup_orphans_removes_only_unknown_sandboxes(sandboxes: Sandboxes) -> None:
    kept = sandboxes.create()
    orphan = sandboxes.create(allow_internet=True)
    removed = asyncio.run(NsBackend(sandboxes.backend.runtime_dir).cleanup_orphans({kept.sandbox_id}))
    assert orphan.sandbox_id in removed and kept.sandbox_id not in removed
    assert not asyncio.run(sandboxes.backend.is_alive(orphan))
    assert asyncio.run(sandboxes.backend.is_alive(kept))
    with socket.create_connection((kept.address, ENVD_PORT), timeout=5):
        pass


def test_stats_report_cpu_memory_and_disk(sandboxes: Sandboxes) -> None:
    handle = sandboxes.create(memory_mb=256, cpu_count=1.0, disk_mb=64)
    backend = sandboxes.backend
    asyncio.run(backend.stats(handle))  # starts the CPU window
    busy = sandboxes.python(
        handle,
        "import time\nx = bytearray(30 * 1024 * 1024)\nx[::4096] = b'y' * len(x[::4096])\n"
        "open('/tmp/blob', 'wb').write(b'z' * 5 * 1024 * 1024)\n"
        "end = time.time() + 0.3\nwhile time.time() < end: pass",
    )
    assert busy["rc"] == 0, busy
    stats = asyncio.run(backend.stats(handle))
    assert stats.cpu_count == 1.0 and 0 < stats.cpu_used_pct <= 100
    assert stats.mem_total_bytes == 256 * 1024 * 1024 and 0 < stats.mem_used_bytes < stats.mem_total_bytes
    assert stats.disk_total_bytes == 64 * 1024 * 1024 and stats.disk_used_bytes >= 5 * 1024 * 1024


def test_create_failures_are_clear_and_leave_nothing(sandboxes: Sandboxes, tmp_path: Path) -> None:
    backend = sandboxes.backend
    with pytest.raises(BackendError, match="invalid sandbox id"):
        asyncio.run(backend.create(sandboxes.spec(sandbox_id="../escape")))
    missing = TemplateImage(name="gone", layers=(str(tmp_path / "missing"),))
    with pytest.raises(BackendError, match="not a directory"):
        asyncio.run(backend.create(sandboxes.spec(template=missing)))
    # a template whose envd exits at once: the error carries envd's log
    broken_layer = tmp_path / "broken"
    envd = broken_layer / "opt/pmoves/bin/envd"
    envd.parent.mkdir(parents=True)
    envd.write_text("#!/bin/sh\necho envd-cannot-start >&2\nexit 3\n")
    envd.chmod(0o755)
    broken = TemplateImage(name="broken", layers=(str(broken_layer), *sandboxes.template.layers[1:]))
    started = time.monotonic()
    with pytest.raises(BackendError, match="envd-cannot-start") as failure:
        asyncio.run(backend.create(sandboxes.spec(template=broken)))
    # seen as soon as it exits, not after waiting ready_timeout for a port nobody will open
    assert "envd exited before listening" in str(failure.value)
    assert time.monotonic() - started < backend.ready_timeout
    assert sandboxes.handles == []
    assert os.listdir(backend.runtime_dir) == []


def test_create_returns_once_the_templates_envd_answers(sandboxes: Sandboxes, base_template: TemplateImage) -> None:
    """The real base template and envd: create returns when envd listens; it got the init secret."""
    spec = sandboxes.spec(template=base_template)
    handle = asyncio.run(sandboxes.backend.create(spec))
    sandboxes.track(handle)
    assert handle.init_secret == spec.init_secret and handle.backend == "ns"
    with socket.create_connection((handle.address, ENVD_PORT), timeout=5) as sock:
        sock.sendall(f"GET /health HTTP/1.1\r\nHost: {handle.address}\r\nConnection: close\r\n\r\n".encode())
        status = sock.recv(100).split(b"\r\n", 1)[0]
    assert status.split()[1] in (b"200", b"204"), status
    # the secret reached envd's environment but appears in no host-visible command line
    for pid in Path(handle.details["cgroups"]["pids"], "cgroup.procs").read_text().split():
        assert spec.init_secret.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()


def test_concurrent_creates_get_distinct_ranges_and_addresses(sandboxes: Sandboxes) -> None:
    backend = sandboxes.backend

    async def create_many() -> list[SandboxHandle]:
        return await asyncio.gather(*(backend.create(sandboxes.spec()) for _ in range(6)), return_exceptions=True)

    results = asyncio.run(create_many())
    handles = [r for r in results if isinstance(r, SandboxHandle)]
    for handle in handles:
        sandboxes.track(handle)
    assert len(handles) == 6, [r for r in results if not isinstance(r, SandboxHandle)]
    assert len({h.address for h in handles}) == 6
    assert len({h.details["uid_base"] for h in handles}) == 6
    for handle in handles:
        assert sandboxes.run(handle, "/bin/true")["rc"] == 0


def test_cleanup_orphans_releases_slots_of_vanished_runtime_dirs(sandboxes: Sandboxes, tmp_path: Path) -> None:
    from pmoves_e2b.sandbox.backends.ns import network

    gone = tmp_path / "deleted-data-dir" / "sandboxes"
    sandbox_id = f"{sandboxes.spec().sandbox_id}-gone"
    slot = sandboxes.backend.slots.allocate(sandbox_id, gone)
    net = network.SandboxNet.for_slot(slot, sandbox_id)
    network.create_netns(net)
    removed = asyncio.run(sandboxes.backend.cleanup_orphans(set()))
    assert sandbox_id in removed
    assert net.netns not in network.list_netns()
    assert slot not in sandboxes.backend.slots.owners()


def test_cleanup_orphans_drops_internet_permission_of_unowned_addresses(sandboxes: Sandboxes) -> None:
    from pmoves_e2b.sandbox.backends.ns import network

    owned = set(sandboxes.backend.slots.owners())
    slot = next(s for s in range(network.MAX_SLOTS - 1, 0, -1) if s not in owned)
    stray = network.SandboxNet.for_slot(slot, "stray")
    network.set_internet(stray, True)
    asyncio.run(sandboxes.backend.cleanup_orphans(set()))
    assert stray.address not in network.internet_addresses()
