"""CPU of a cold sandbox: ns backend create until envd answers /health, envd forked from the
template's zygote vs started by the sandbox's launcher (issue 16 item 1).

Run as root: ``.venv/bin/python bench/bench_cold_start.py [--runs 20] [--template base]``.
CPU-ms per sandbox = user+sys of every process involved: this process (the backend's threads and
the /health poll), its reaped children (nsenter, ip, nft, mount helpers), the sandbox's cgroup
(bwrap, the launcher, envd) and the zygote with its reaped children (the forks that enter the
sandbox). Baselines from the same run: fork+exec of /bin/true and ``python3 -c pass`` (CPU from
wait4), ``bwrap ... python3 -c pass`` on the template's rootfs (wall only: bwrap exits before its
init is reaped, so wait4 does not see the sandbox's CPU).
"""

from __future__ import annotations

import argparse
import os
import resource
import secrets
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from measure import bwrap_argv

from pmoves_e2b.sandbox.backends.base import ENVD_PORT, SandboxSpec
from pmoves_e2b.sandbox.backends.ns import NsBackend
from pmoves_e2b.sandbox.backends.ns.cgroups import SandboxCgroups
from pmoves_e2b.sandbox.templates.store import load_template

TICK_MS = 1000 / os.sysconf("SC_CLK_TCK")


def own_cpu_ms() -> float:
    """This process and its reaped children."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return (me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime) * 1000


def zygote_cpu_ms(backend: NsBackend) -> float:
    """utime+stime+cutime+cstime of the zygotes (they reap the forks that enter sandboxes)."""
    total = 0.0
    for pid in backend.zygotes.pids() if backend.zygotes is not None else ():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(value) for value in fields[11:15]) * TICK_MS
    return total


def wait_health(address: str) -> None:
    for _ in range(5000):
        try:
            with urllib.request.urlopen(f"http://{address}:{ENVD_PORT}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.002)
    raise RuntimeError("envd did not answer /health")


def cold_starts(backend: NsBackend, template, runs: int, warmup: int = 2) -> tuple[list[float], list[float]]:  # type: ignore[no-untyped-def]
    """(wall ms, CPU ms) per sandbox: backend create until envd answers /health."""
    walls, cpus = [], []
    for i in range(runs + warmup):
        spec = SandboxSpec(
            sandbox_id=f"cold{os.getpid()}-{i}", template=template, memory_mb=512, cpu_count=1.0,
            disk_mb=256, allow_internet=False, init_secret=secrets.token_hex(16),
        )  # fmt: skip
        cpu0, zygote0, started = own_cpu_ms(), zygote_cpu_ms(backend), time.perf_counter()
        handle = backend.create_sync(spec)
        wait_health(handle.address)
        wall = (time.perf_counter() - started) * 1000
        cpu = own_cpu_ms() - cpu0 + zygote_cpu_ms(backend) - zygote0
        cpu += SandboxCgroups.from_dict(handle.details["cgroups"]).cpu_usage_usec() / 1000
        backend.destroy_sync(handle)
        if i >= warmup:
            walls.append(wall)
            cpus.append(cpu)
    return walls, cpus


def spawn_cost(argv: list[str], runs: int) -> tuple[list[float], list[float]]:
    """(wall ms, CPU ms of the child) per fork+exec+wait of argv."""
    walls, cpus = [], []
    for _ in range(runs):
        started = time.perf_counter()
        pid = os.posix_spawn(argv[0], argv, {"PATH": "/usr/bin:/bin"})
        _, status, usage = os.wait4(pid, 0)
        walls.append((time.perf_counter() - started) * 1000)
        cpus.append((usage.ru_utime + usage.ru_stime) * 1000)
        if status:
            raise RuntimeError(f"{argv} exited with {status}")
    return walls, cpus


def row(name: str, walls: list[float], cpus: list[float], base_cpu: float | None = None) -> None:
    wall, cpu = statistics.median(walls), statistics.median(cpus)
    ratio = f"   {cpu / base_cpu:5.1f}x python3 -c pass CPU" if base_cpu else ""
    print(f"  {name:46s} wall p50 {wall:7.1f} ms   CPU p50 {cpu:6.1f} ms{ratio}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--template", default="base")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the backend needs namespaces, cgroups and nftables")
    template = load_template(args.template)
    work = Path(tempfile.mkdtemp(prefix="pmoves-e2b-bench-"))
    work.chmod(0o711)
    forked = NsBackend(work / "sandboxes")
    cold = NsBackend(work / "sandboxes", zygote=False)
    if forked.zygotes is None or forked.zygotes.layers_for(template.layers) is None:
        sys.exit(f"template {args.template!r} has no zygote-capable envd layer: rebuild it")
    bwrap = bwrap_argv(template.layers[-1])
    try:
        print(f"cold sandbox, template {args.template!r}, n={args.runs} (load {os.getloadavg()[0]:.2f})")
        print("baselines:")
        row("fork+exec /bin/true", *spawn_cost(["/bin/true"], args.runs))
        python_walls, _ = spawn_cost([*bwrap, "/usr/bin/python3", "-c", "pass"], args.runs)
        python_direct = spawn_cost(["/usr/bin/python3", "-c", "pass"], args.runs)
        row("python3 -c pass", *python_direct)
        base = statistics.median(python_direct[1])
        print(f"  {'bwrap ... python3 -c pass':46s} wall p50 {statistics.median(python_walls):7.1f} ms", flush=True)
        print("create -> envd answers /health (all processes' user+sys):")
        before_walls, before_cpus = cold_starts(cold, template, args.runs)
        row("envd started by the launcher (before)", before_walls, before_cpus, base)
        after_walls, after_cpus = cold_starts(forked, template, args.runs)
        row("envd forked from the zygote (now)", after_walls, after_cpus, base)
        print(
            f"  CPU per cold sandbox: {statistics.median(after_cpus) / statistics.median(before_cpus):.2f} of before"
            f" (goal: at most 0.33)",
            flush=True,
        )
    finally:
        forked.cleanup_orphans_sync(set())
        forked.close()
        cold.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
