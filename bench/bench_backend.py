"""The ns isolation backend: create → envd listening, destroy, and idle memory per sandbox.

Run as root: ``.venv/bin/python bench/bench_backend.py [--runs 30] [--idle 10] [--template base]``.
Baselines come from the same run: fork+exec of /bin/true, bwrap running /bin/true and
``python3 -c pass`` on the template's rootfs (envd's start is mostly python start + imports).
Creates run one after another (no warm pool: that is the control plane's), timed with
``perf_counter`` around ``NsBackend.create_sync`` / ``destroy_sync``.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from measure import bwrap_argv, percentiles, timed

from pmoves_e2b.sandbox.backends.base import SandboxSpec
from pmoves_e2b.sandbox.backends.ns import NsBackend
from pmoves_e2b.sandbox.backends.ns.cgroups import SandboxCgroups
from pmoves_e2b.sandbox.templates.store import load_template


def spawn_and_wait(argv: list[str]) -> None:
    pid = os.posix_spawn(argv[0], argv, {"PATH": "/usr/bin:/bin"})
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise RuntimeError(f"{argv} exited with {status}")


def pss_kib(pid: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


BARE_LISTENER = "import socket, time; s = socket.socket(); s.bind(('0.0.0.0', 49983)); s.listen(); time.sleep(1e9)"


def create_destroy_loop(
    backend: NsBackend, spec: Callable[[], SandboxSpec], runs: int, warmup: int = 3
) -> tuple[list[float], list[float]]:
    creates, destroys = [], []
    for i in range(runs + warmup):
        start = time.perf_counter()
        handle = backend.create_sync(spec())
        created = time.perf_counter()
        backend.destroy_sync(handle)
        done = time.perf_counter()
        if i >= warmup:
            creates.append((created - start) * 1000)
            destroys.append((done - created) * 1000)
    return creates, destroys


def row(name: str, samples: list[float], baseline: float | None = None) -> None:
    p50, p95 = percentiles(samples)
    ratio = f"  ×{p50 / baseline:.1f} of fork+exec" if baseline else ""
    print(f"  {name:<44} p50 {p50:8.2f} ms   p95 {p95:8.2f} ms{ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--idle", type=int, default=10, help="sandboxes kept alive for the memory figure")
    parser.add_argument("--template", default="base")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the backend needs namespaces, cgroups and nftables")

    template = load_template(args.template)
    rootfs = template.layers[-1]
    work = Path(tempfile.mkdtemp(prefix="pmoves-e2b-bench-"))
    work.chmod(0o711)
    backend = NsBackend(work / "sandboxes")
    counter = iter(range(10**6))

    def spec() -> SandboxSpec:
        return SandboxSpec(
            sandbox_id=f"bench{os.getpid()}-{next(counter)}", template=template, memory_mb=512,
            cpu_count=1.0, disk_mb=256, allow_internet=False, init_secret=secrets.token_hex(16),
        )  # fmt: skip

    bwrap = bwrap_argv(rootfs)
    try:
        print(f"ns backend, template {args.template!r}, n={args.runs} (load {os.getloadavg()[0]:.2f})")
        print("baselines:")
        fork_exec = timed(lambda: spawn_and_wait(["/bin/true"]), args.runs, warmup=3)
        base = percentiles(fork_exec)[0]
        row("fork+exec /bin/true", fork_exec)
        bwrap_true = timed(lambda: spawn_and_wait([*bwrap, "/bin/true"]), args.runs, warmup=3)
        row("bwrap --unshare-all /bin/true (template rootfs)", bwrap_true, base)
        python_pass = timed(lambda: spawn_and_wait([*bwrap, "/usr/bin/python3", "-c", "pass"]), args.runs, warmup=3)
        row("bwrap ... python3 -c pass", python_pass, base)

        print("backend:")
        # the backend's own share: the same sandbox whose first process is a bare python listener
        listener = NsBackend(work / "sandboxes", init_argv=("/usr/bin/python3", "-S", "-c", BARE_LISTENER))
        bare, _ = create_destroy_loop(listener, spec, args.runs)
        row("create → bare python3 -S listener", bare, base)
        creates, destroys = create_destroy_loop(backend, spec, args.runs)
        row("create → envd listening", creates, base)
        p50_create, p50_python = percentiles(creates)[0], percentiles(python_pass)[0]
        print(f"  {'':<44} = python3 -c pass ×{p50_create / p50_python:.1f}")
        row("destroy (kill, umount, cgroups, netns, dir)", destroys, base)

        handles = [backend.create_sync(spec()) for _ in range(args.idle)]
        try:
            time.sleep(2)  # let envd settle after start-up before measuring idle memory
            pss, charged = [], []
            for handle in handles:
                cg = SandboxCgroups.from_dict(handle.details["cgroups"])
                pss.append(sum(pss_kib(pid) for pid in (Path(cg.pids) / "cgroup.procs").read_text().split()))
                charged.append(cg.memory_usage()[0] // 1024)
            print(f"idle memory per sandbox ({args.idle} alive, envd idle):")
            print(f"  PSS of its processes      median {statistics.median(pss) / 1024:6.1f} MiB")
            print(f"  memory cgroup (no cache)  median {statistics.median(charged) / 1024:6.1f} MiB")
        finally:
            for handle in handles:
                backend.destroy_sync(handle)
    finally:
        backend.cleanup_orphans_sync(set())
        backend.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
