"""The gvisor isolation tier: its create against raw ``runsc run`` of the same rootfs, and through
the stock SDKs beside the ns tier of the same stack.

Run as root: ``.venv/bin/python bench/bench_gvisor.py [--runs 8] [--command-runs 30]`` (with
``--checkpoints-only``: the GvisorBackend checkpoint rows alone).
Baselines from the same run:
- raw runsc: ``runsc run --detach`` (ptrace, host network in a bare netns, no cgroups) of the base
  template's layers as an overlay on a tmpfs upper, until envd accepts TCP; then kill and delete.
  ``GvisorBackend.create`` does the same plus our setup (slot, cgroups, veth + nftables, disk image,
  statx shim) until envd accepts TCP on the sandbox address: the "within 1.2x" goal of issue 18.
- the freezer (``GvisorBackend.pause``/``resume``) and raw ``runsc checkpoint`` / ``runsc restore``
  (the runsc calls alone, on the same sandbox) beside ``GvisorBackend.checkpoint``/``restore`` (the
  gate, the scans inside, the quiesce, then the same calls), on one backend sandbox; and the two
  checkpoints again on a sandbox running 40 more processes (what the scans inside walk);
- the ns tier's ``Sandbox.create()``, ``commands.run("true")``, ``run_code("1+1")`` and pause/resume
  (on gvisor a checkpoint to disk and a restore), on one stack (pool off, 512 MB / 1 CPU sandboxes)
  where each create picks its tier by metadata; on gvisor also ``create_snapshot()`` (a checkpoint
  and its restore in place) and ``Sandbox.create(snapshot)`` (a restore) beside a plain create.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from stack.harness import SHARED_TEMPLATES_DIR  # noqa: E402
from tier_sdk import command_true, create_kill, pause_resume, row, run_code, tier_stack  # noqa: E402

from pmoves_e2b.sandbox.backends.base import SandboxHandle, SandboxSpec  # noqa: E402
from pmoves_e2b.sandbox.backends.gvisor import GvisorBackend, runsc  # noqa: E402
from pmoves_e2b.sandbox.backends.ns import ENVD_ARGV, network  # noqa: E402
from pmoves_e2b.sandbox.templates.store import load_template  # noqa: E402

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _listening_in_netns(netns: str, port: int, timeout: float) -> bool:
    """Poll 127.0.0.1:port from a thread that joined the netns (setns is per thread)."""
    result: list[bool] = []

    def worker() -> None:
        fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
        try:
            _libc.setns(fd, CLONE_NEWNET)
        finally:
            os.close(fd)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                result.append(True)
                return
            except OSError:
                time.sleep(0.002)
        result.append(False)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    return result[0]


def raw_runsc(runs: int) -> list[float]:
    layers = load_template("base", SHARED_TEMPLATES_DIR).layers
    work = Path(tempfile.mkdtemp(prefix="pmoves-e2b-bench-runsc-"))
    netns = f"bench-runsc-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
    samples = []
    try:
        for n in range(runs):
            box = work / str(n)
            rootfs, upper = box / "m", box / "rw"
            rootfs.mkdir(parents=True)
            upper.mkdir()
            subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(upper)], check=True)
            (upper / "u").mkdir()
            (upper / "w").mkdir()
            lower = ":".join(layers)
            options = f"lowerdir={lower},upperdir={upper}/u,workdir={upper}/w"
            subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(rootfs)], check=True)
            config = {
                "ociVersion": "1.0.2",
                "process": {
                    "user": {"uid": 0, "gid": 0},
                    "args": list(ENVD_ARGV),
                    "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "ENVD_INIT_SECRET=x"],
                    "cwd": "/",
                },
                "root": {"path": str(rootfs)},
                "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
                "linux": {"namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")]},
            }
            (box / "config.json").write_text(json.dumps(config))
            runsc = ["nsenter", f"--net=/run/netns/{netns}", "runsc", f"--root={box}/state", "--platform=ptrace"]
            runsc += ["--network=host", "--ignore-cgroups"]
            started = time.perf_counter()
            subprocess.run([*runsc, "run", "--detach", f"--bundle={box}", f"raw{n}"], check=True, timeout=60)
            if not _listening_in_netns(netns, 49983, 60):
                raise RuntimeError("envd did not listen under raw runsc")
            samples.append(time.perf_counter() - started)
            subprocess.run([*runsc, "kill", f"raw{n}", "KILL"], check=False, timeout=60)
            subprocess.run([*runsc, "delete", "--force", f"raw{n}"], check=False, timeout=60)
            subprocess.run(["umount", str(rootfs)], check=True)
            subprocess.run(["umount", str(upper)], check=True)
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)
        shutil.rmtree(work, ignore_errors=True)
    return samples


def backend_creates(runs: int) -> list[float]:
    template = load_template("base", SHARED_TEMPLATES_DIR)
    runtime = Path(tempfile.mkdtemp(prefix="pmoves-e2b-bench-gvisor-")) / "sandboxes-gvisor"
    backend = GvisorBackend(runtime)
    samples = []
    try:
        for n in range(runs):
            spec = SandboxSpec(f"bench{n}", template, 512, 1.0, 1024, False, secrets.token_hex(8), "gvisor")
            started = time.perf_counter()
            handle = asyncio.run(backend.create(spec))
            samples.append(time.perf_counter() - started)
            asyncio.run(backend.destroy(handle))
    finally:
        asyncio.run(backend.cleanup_orphans(set()))
        backend.close()
        shutil.rmtree(runtime.parent, ignore_errors=True)
    return samples


def raw_checkpoint_restore(backend: GvisorBackend, handle: SandboxHandle, image: Path) -> tuple[float, float]:
    """``runsc checkpoint`` and ``runsc restore`` (until envd accepts TCP) of a backend sandbox, as
    runsc alone does them: no gate, no scan, no quiesce (the sandbox is idle, nothing connects)."""
    root, net = (
        Path(handle.details["runsc_root"]),
        network.SandboxNet.for_slot(handle.details["slot"], handle.sandbox_id),
    )
    # untimed: the connections of the restore's ready probe end in the netstack first (runsc alone
    # cannot save one that is still connected, and nothing here waits for it as the quiesce does)
    time.sleep(1.0)
    started = time.perf_counter()
    runsc.checkpoint(root, net.netns_path, handle.sandbox_id, image)
    saved = time.perf_counter() - started
    cg = backend._cgroups(handle)
    backend._stop_processes(handle.sandbox_id, handle.details, cg)
    runsc.delete(root, net.netns_path, handle.sandbox_id)
    network.readdress(net)
    started = time.perf_counter()
    backend._run_runsc(handle.sandbox_id, handle.details, cg, net, image)
    asyncio.run(backend._wait_ready(handle))
    return saved, time.perf_counter() - started


def backend_pauses(runs: int, processes: int = 0) -> dict[str, list[float]]:
    """On one GvisorBackend sandbox: the freezer (pause, resume), raw runsc checkpoint/restore and
    the backend's checkpoint to disk and its restore in place (each until envd accepts TCP again),
    ``runs`` times each; with ``processes`` more processes running in it (sleeps: what the scans
    inside walk), which the checkpoints keep."""
    template = load_template("base", SHARED_TEMPLATES_DIR)
    runtime = Path(tempfile.mkdtemp(prefix="pmoves-e2b-bench-gvisor-")) / "sandboxes-gvisor"
    backend = GvisorBackend(runtime)
    freezes, thaws, checkpoints, restores, raw_saves, raw_restores = [], [], [], [], [], []
    try:
        spec = SandboxSpec("benchpause", template, 512, 1.0, 1024, False, secrets.token_hex(8), "gvisor")
        handle = asyncio.run(backend.create(spec))
        if processes:
            root, net = (
                Path(handle.details["runsc_root"]),
                network.SandboxNet.for_slot(handle.details["slot"], handle.sandbox_id),
            )
            script = f"for i in $(seq {processes}); do sleep 100000 >/dev/null 2>&1 & done"
            runsc.shell(root, net.netns_path, handle.sandbox_id, script)
        for n in range(runs):
            started = time.perf_counter()
            asyncio.run(backend.pause(handle))
            freezes.append(time.perf_counter() - started)
            started = time.perf_counter()
            asyncio.run(backend.resume(handle))
            thaws.append(time.perf_counter() - started)
            image = runtime.parent / f"image-{n}"
            image.mkdir()
            started = time.perf_counter()
            asyncio.run(backend.checkpoint(handle, image))
            checkpoints.append(time.perf_counter() - started)
            started = time.perf_counter()
            asyncio.run(backend.restore(handle, image))
            restores.append(time.perf_counter() - started)
            shutil.rmtree(image)
            image.mkdir()
            saved, restored = raw_checkpoint_restore(backend, handle, image)
            raw_saves.append(saved)
            raw_restores.append(restored)
            shutil.rmtree(image)
        asyncio.run(backend.destroy(handle))
    finally:
        asyncio.run(backend.cleanup_orphans(set()))
        backend.close()
        shutil.rmtree(runtime.parent, ignore_errors=True)
    return {
        "freeze": freezes,
        "thaw": thaws,
        "checkpoint": checkpoints,
        "restore": restores,
        "raw checkpoint": raw_saves,
        "raw restore": raw_restores,
    }


def snapshots(runs: int) -> tuple[list[float], list[float], list[float]]:
    """On gvisor through the SDK: ``create_snapshot()`` of a running sandbox, ``Sandbox.create`` from
    that snapshot (a restore) and, as its baseline, a plain ``Sandbox.create`` (a boot)."""
    from e2b import Sandbox

    takes, restores, boots = [], [], []
    source = Sandbox.create(metadata={"e2b.isolation": "gvisor"}, request_timeout=120)
    try:
        for _ in range(runs):
            started = time.perf_counter()
            snapshot = source.create_snapshot()
            takes.append(time.perf_counter() - started)
            started = time.perf_counter()
            made = Sandbox.create(snapshot.snapshot_id, request_timeout=120)
            restores.append(time.perf_counter() - started)
            made.kill()
            Sandbox.delete_snapshot(snapshot.snapshot_id)
            started = time.perf_counter()
            booted = Sandbox.create(metadata={"e2b.isolation": "gvisor"}, request_timeout=120)
            boots.append(time.perf_counter() - started)
            booted.kill()
    finally:
        source.kill()
    return takes, restores, boots


BUSY_PROCESSES = 40


def checkpoint_rows(runs: int, only_busy: bool = False) -> None:
    """GvisorBackend.checkpoint beside raw runsc checkpoint of the same sandbox, idle (unless
    ``only_busy``: main's rows have it) and with ``BUSY_PROCESSES`` more processes in it."""
    for processes in (0, BUSY_PROCESSES)[only_busy:]:
        pauses = backend_pauses(runs, processes)
        label = f", {processes} more processes" if processes else ""
        row(f"raw runsc checkpoint{label} (baseline)", pauses["raw checkpoint"])
        row(f"GvisorBackend.checkpoint{label}", pauses["checkpoint"], "raw runsc", pauses["raw checkpoint"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--command-runs", type=int, default=30)
    parser.add_argument("--pause-runs", type=int, default=5)
    parser.add_argument("--checkpoints-only", action="store_true", help="only the GvisorBackend checkpoint rows")
    options = parser.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.1f} (2 cores)", flush=True)
    if options.checkpoints_only:
        checkpoint_rows(options.pause_runs)
        print(f"load average at end: {os.getloadavg()[0]:.1f}", flush=True)
        return
    raw = raw_runsc(options.runs)
    ours = backend_creates(options.runs)
    row("raw runsc run --detach -> envd listens (baseline)", raw)
    row("GvisorBackend.create -> envd listens", ours, "raw runsc", raw)
    pauses = backend_pauses(options.pause_runs)
    row("GvisorBackend.pause (freezer, baseline)", pauses["freeze"])
    row("GvisorBackend.resume (thaw, baseline)", pauses["thaw"])
    row("raw runsc checkpoint (baseline)", pauses["raw checkpoint"])
    row("raw runsc restore -> envd listens (baseline)", pauses["raw restore"])
    row("GvisorBackend.checkpoint (gate, scans, quiesce)", pauses["checkpoint"], "raw runsc", pauses["raw checkpoint"])
    row("GvisorBackend.restore -> envd listens", pauses["restore"], "raw runsc", pauses["raw restore"])
    checkpoint_rows(options.pause_runs, only_busy=True)
    print(f"load average now: {os.getloadavg()[0]:.1f}", flush=True)
    with tier_stack():
        ns_create = create_kill("ns", options.runs)
        gv_create = create_kill("gvisor", options.runs)
        ns_command, _ = command_true("ns", options.command_runs)
        gv_command, gv_pss = command_true("gvisor", options.command_runs)
        ns_code = run_code("ns", options.command_runs)
        gv_code = run_code("gvisor", options.command_runs)
        ns_pause, ns_resume = pause_resume("ns", options.pause_runs)
        gv_pause, gv_resume = pause_resume("gvisor", options.pause_runs)
        ns_disk, ns_boot = pause_resume("ns", options.pause_runs, mode="filesystem")
        gv_disk, gv_boot = pause_resume("gvisor", options.pause_runs, mode="filesystem")
        snap_takes, snap_restores, snap_boots = snapshots(options.pause_runs)
    row("ns: Sandbox.create() (pool off, baseline)", ns_create)
    row("gvisor: Sandbox.create() (pool off)", gv_create, "ns", ns_create)
    row("gvisor: Sandbox.create() vs raw runsc", gv_create, "raw runsc", raw)
    row('ns: commands.run("true") (baseline)', ns_command)
    row('gvisor: commands.run("true")', gv_command, "ns", ns_command)
    row('ns: run_code("1+1") (baseline)', ns_code)
    row('gvisor: run_code("1+1")', gv_code, "ns", ns_code)
    row("ns: pause (freeze, baseline)", ns_pause)
    row("gvisor: pause (checkpoint to disk)", gv_pause, "ns", ns_pause)
    row("gvisor: pause (checkpoint) vs raw runsc", gv_pause, "raw runsc checkpoint", pauses["raw checkpoint"])
    row("ns: resume (connect, baseline)", ns_resume)
    row("gvisor: resume (connect: restore)", gv_resume, "ns", ns_resume)
    row("gvisor: resume (restore) vs raw runsc", gv_resume, "raw runsc restore", pauses["raw restore"])
    row("gvisor: create_snapshot() (checkpoint+restore)", snap_takes, "raw runsc checkpoint", pauses["raw checkpoint"])
    row("gvisor: Sandbox.create() boot (baseline)", snap_boots)
    row("gvisor: Sandbox.create(snapshot) (restore)", snap_restores, "boot", snap_boots)
    row("ns: pause to disk (mode filesystem, baseline)", ns_disk)
    row("gvisor: pause to disk (mode filesystem)", gv_disk, "ns", ns_disk)
    row("ns: resume from disk (boots, baseline)", ns_boot)
    row("gvisor: resume from disk (boots)", gv_boot, "ns", ns_boot)
    print(f"gvisor: idle sandbox host PSS (runsc sandbox + gofer) {gv_pss / 1024:.0f} MB", flush=True)
    print(f"load average at end: {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
