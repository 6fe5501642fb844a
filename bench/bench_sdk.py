"""The sandbox core through the stock `e2b` SDK, as users see it.

Run as root: ``.venv/bin/python bench/bench_sdk.py [--runs 30] [--concurrent 50] [--idle 200]``.
Starts its own stack (temp data dir, free ports). Baselines come from the same run: fork+exec
of /bin/true and ``bwrap ... /bin/true`` (the floor of any namespace sandbox).

Prints: ``Sandbox.create()`` p50/p95 with the warm pool and with the pool off; 20 sandboxes held
and created one after another, twice, with a fixed pool of 2 and with the pool following demand
(``--held-only`` prints just that); the
``commands.run("true")`` round trip; N concurrent creates (all must succeed; p99); sustained
creates per second (4 clients in a create+kill loop); idle memory per sandbox; how many idle
sandboxes were alive at once. ``--netns-ab`` also runs the pool-off rows with
``E2B_NETNS_REUSE=false`` (a netns made and destroyed per sandbox). ``--before`` also runs the
pool-off rows with ``E2B_ENVD_ZYGOTE=false`` (every sandbox starts its own envd, as before the
zygote); ``--before-tree DIR`` runs them from an older checkout (``--before-templates DIR``: with the
templates, e.g. an envd layer, built from it). The sustained rows print the CPU per create+kill of
every process involved, the minor page faults of the sandboxes and zygotes, and the CPU inside the
sandboxes' cgroups (the forked envd included, which no reaped-children sum has).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from measure import bwrap_argv, pct, timed  # noqa: E402
from stack.harness import make_stack, stop_and_clean  # noqa: E402


def fork_exec_true(runs: int) -> list[float]:
    return timed(lambda: subprocess.run(["/bin/true"], check=True), runs)


def bwrap_true(runs: int) -> list[float]:
    bwrap = shutil.which("bwrap") or "/usr/bin/bwrap"
    argv = [
        bwrap,
        "--ro-bind",
        "/usr",
        "/usr",
        "--symlink",
        "usr/bin",
        "/bin",
        "--symlink",
        "usr/lib",
        "/lib",
        "--symlink",
        "usr/lib64",
        "/lib64",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--unshare-all",
        "--die-with-parent",
        "/bin/true",
    ]
    return timed(lambda: subprocess.run(argv, check=True), runs)


def bwrap_python(runs: int) -> list[float]:
    argv = [*bwrap_argv("/"), "/usr/bin/python3", "-c", "pass"]
    return timed(lambda: subprocess.run(argv, check=True), runs)


TICK_MS = 1000 / os.sysconf("SC_CLK_TCK")


def _proc_cpu_ms(pid: int) -> tuple[float, float]:
    """(own user+sys, reaped children's user+sys) of a process, in ms."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * TICK_MS, (int(fields[13]) + int(fields[14])) * TICK_MS


def _proc_minor_faults(pid: int) -> tuple[int, int]:
    """(own, reaped children's) minor page faults of a process: mostly copy-on-write after a fork."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[7]), int(fields[8])


def _zygote_pids() -> list[int]:
    host_pid_ns, found = os.readlink("/proc/self/ns/pid"), []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"ENVD_ZYGOTE=" in (entry / "environ").read_bytes() and os.readlink(entry / "ns/pid") == host_pid_ns:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def cpu_snapshot(stack) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """CPU ms so far of every process a create+kill uses: e2b-sandbox itself; its reaped children (ip,
    the sandbox's exec chain and bwrap, which reaps the sandbox's init, which reaps envd); the envd
    zygotes with their reaped forks; nats-server; this client. Machine-wide busy time for the load."""
    own, children = _proc_cpu_ms(stack.service_pid("sandbox"))
    zygote = sum(sum(_proc_cpu_ms(pid)) for pid in _zygote_pids())
    nats_pid = stack.service_pid("nats")
    nats = sum(_proc_cpu_ms(nats_pid)) if nats_pid else 0.0
    me = os.times()
    cpu = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = (sum(cpu) - cpu[3] - cpu[4]) * TICK_MS
    return {"e2b-sandbox": own, "its children + sandboxes": children, "envd zygotes": zygote, "nats": nats,
            "client": (me.user + me.system) * 1000, "machine busy (all users)": busy}  # fmt: skip


def sandbox_cgroups_cpu_ms(stack) -> float:  # type: ignore[no-untyped-def]
    """CPU so far of everything that ran in the stack's ns sandboxes' cgroups (bwrap, the launcher
    and the forked envd, ended ones included: a removed group's usage stays in its parent). The
    forked envd is in no reaped-children sum: the sandbox's init is killed before it reaps it."""
    from pmoves_e2b.sandbox.backends.ns import cgroups

    runtime_dir = (stack.data_dir / "sandboxes").resolve()
    name = f"pmoves-e2b-{hashlib.sha256(str(runtime_dir).encode()).hexdigest()[:10]}"
    total = 0.0
    for parent in cgroups.existing_parent_dirs(name):
        if parent.is_relative_to(cgroups.CGROUP_ROOT / cgroups.UNIFIED):
            stat = dict(line.split() for line in (parent / "cpu.stat").read_text().splitlines())
            total += int(stat["usage_usec"]) / 1000
    return total


def fault_snapshot(stack) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """Minor page faults so far: e2b-sandbox's reaped children (the sandboxes: bwrap, its init and
    the forked envd it reaps) and the envd zygotes with their reaped forks."""
    zygotes = [_proc_minor_faults(pid) for pid in _zygote_pids()]
    return {"its children + sandboxes": _proc_minor_faults(stack.service_pid("sandbox"))[1],
            "envd zygotes": sum(own + children for own, children in zygotes)}  # fmt: skip


def sustained(clients: int, seconds: float, stack=None) -> tuple[int, float]:  # type: ignore[no-untyped-def]
    """``clients`` threads each creating and killing sandboxes in a loop: (creates, creates per second).
    With ``stack``, also prints the CPU per create of each process involved."""
    from e2b import Sandbox

    stop, done, errors = threading.Event(), [0] * clients, []

    def loop(index: int) -> None:
        while not stop.is_set():
            try:
                Sandbox.create(timeout=120).kill()
            except Exception as exc:  # noqa: BLE001 - counted and shown
                errors.append(repr(exc))
                continue
            done[index] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    before = cpu_snapshot(stack) if stack is not None else {}
    faults_before = fault_snapshot(stack) if stack is not None else {}
    sandboxes_before = sandbox_cgroups_cpu_ms(stack) if stack is not None else 0.0
    load = os.getloadavg()[0]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        print(f"  ({len(errors)} creates failed, e.g. {errors[0][:200]})", flush=True)
    if stack is not None and sum(done):
        time.sleep(2)  # the last teardowns
        after = cpu_snapshot(stack)
        per = {name: (after[name] - before[name]) / sum(done) for name in before}
        ours = sum(value for name, value in per.items() if name != "machine busy (all users)")
        parts = ", ".join(f"{name} {value:.1f}" for name, value in per.items())
        print(f"  CPU ms per create+kill: {parts}; ours {ours:.1f} (load average {load:.1f} at start)", flush=True)
        faults = fault_snapshot(stack)
        parts = ", ".join(f"{name} {(faults[name] - faults_before[name]) / sum(done):.0f}" for name in faults)
        print(f"  minor page faults per create+kill: {parts}", flush=True)
        inside = (sandbox_cgroups_cpu_ms(stack) - sandboxes_before) / sum(done)
        print(f"  CPU ms per create+kill in the sandboxes' cgroups (bwrap, launcher, envd): {inside:.1f}", flush=True)
    return sum(done), sum(done) / elapsed


def line(name: str, values: list[float], base_name: str, base: list[float]) -> None:
    p50, p95, b50 = statistics.median(values), pct(values, 0.95), statistics.median(base)
    print(
        f"{name:42s} p50 {p50:8.2f} ms  p95 {p95:8.2f} ms   baseline {base_name} p50 {b50:6.2f} ms"
        f"   ratio {p50 / b50:6.1f}x",
        flush=True,
    )


def pss_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for row in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if row.startswith("Pss:"):
                    total += int(row.split()[1])
        except OSError:
            continue
    return total


def sandbox_pids(stack) -> list[int]:  # type: ignore[no-untyped-def]
    """Processes in this stack's sandboxes (their cgroup path carries its runtime dir's tag; other
    stacks on the machine have other tags), and its envd zygotes (children of its e2b-sandbox, outside
    any sandbox, sharing their pages with all of them)."""
    runtime_dir = (stack.data_dir / "sandboxes").resolve()
    tag = "pmoves-e2b-" + hashlib.sha256(str(runtime_dir).encode()).hexdigest()[:10]
    service = stack.service_pid("sandbox")
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if tag in (entry / "cgroup").read_text():
                    pids.append(int(entry.name))
                elif int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == service and (
                    b"ENVD_ZYGOTE=" in (entry / "environ").read_bytes()
                ):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def measure(stack, options: argparse.Namespace, bases: dict[str, list[float]]) -> None:  # type: ignore[no-untyped-def]
    from e2b import Sandbox

    os.environ.update(stack.sdk_env)
    warm = []
    for _ in range(options.runs):
        started = time.perf_counter()
        sbx = Sandbox.create(timeout=120)
        warm.append((time.perf_counter() - started) * 1000)
        sbx.kill()
        time.sleep(0.3)  # let the pool refill: this row measures claims, not boots
    line(f"create, warm pool (n={options.runs})", warm, "bwrap /bin/true", bases["bwrap"])

    sbx = Sandbox.create(timeout=300)
    sbx.commands.run("true")
    runs = timed(lambda: sbx.commands.run("true"), options.runs * 5)
    line(f"commands.run('true') (n={options.runs * 5})", runs, "fork+exec /bin/true", bases["fork"])
    sbx.kill()


def measure_cold(
    stack, options: argparse.Namespace, bases: dict[str, list[float]], label: str = "", burst: bool = True
) -> None:  # type: ignore[no-untyped-def]
    from e2b import Sandbox

    os.environ.update(stack.sdk_env)
    cold = []
    for _ in range(options.runs):
        started = time.perf_counter()
        sbx = Sandbox.create(timeout=120)
        cold.append((time.perf_counter() - started) * 1000)
        sbx.kill()
    line(f"create, pool off{label} (n={options.runs})", cold, "bwrap /bin/true", bases["bwrap"])
    line(f"create, pool off{label} (n={options.runs})", cold, "bwrap python3 -c pass", bases["python"])
    count, rate = sustained(options.clients, options.seconds, stack)
    print(
        f"sustained, pool off{label}: {options.clients} clients create+kill for {options.seconds:.0f} s: "
        f"{count} creates, {rate:.1f} creates/s",
        flush=True,
    )
    if not burst:
        return

    time.sleep(3)  # the loop's teardowns end before the burst
    with ThreadPoolExecutor(max_workers=options.concurrent) as pool:
        started = time.perf_counter()

        def one(_: int) -> tuple[float, str]:
            t0 = time.perf_counter()
            box = Sandbox.create(timeout=300)
            return (time.perf_counter() - t0) * 1000, box.sandbox_id

        results = list(pool.map(one, range(options.concurrent)))
        wall = time.perf_counter() - started
    lat = [r[0] for r in results]
    print(
        f"{options.concurrent} concurrent creates{label}: all {len(results)} succeeded, p50 {statistics.median(lat):.0f} ms,"
        f" p99 {pct(lat, 0.99):.0f} ms, wall {wall:.1f} s -> {len(results) / wall:.1f} creates/s sustained",
        flush=True,
    )
    time.sleep(3)
    pids = sandbox_pids(stack)
    per_box = pss_kb(pids) / max(1, len(results))
    print(
        f"idle memory per base sandbox: {per_box / 1024:.1f} MB PSS ({len(pids)} processes"
        f" for {len(results)} sandboxes)",
        flush=True,
    )
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda r: Sandbox.kill(r[1]), results))

    alive = []
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            alive = list(pool.map(lambda _: Sandbox.create(timeout=600).sandbox_id, range(options.idle)))
        print(
            f"idle base sandboxes alive at once: {len(alive)} (asked for {options.idle}); "
            f"PSS total {pss_kb(sandbox_pids(stack)) / 1024:.0f} MB",
            flush=True,
        )
    finally:
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(Sandbox.kill, alive))


def measure_held(stack, count: int, bases: dict[str, list[float]], label: str) -> None:  # type: ignore[no-untyped-def]
    """A script that holds ``count`` sandboxes, created one after another; two rounds (the second
    shows what the pool learned from the first)."""
    from e2b import Sandbox

    os.environ.update(stack.sdk_env)
    for round_no in (1, 2):
        held, times = [], []
        for _ in range(count):
            started = time.perf_counter()
            held.append(Sandbox.create(timeout=300))
            times.append((time.perf_counter() - started) * 1000)
        line(f"{count} held, one after another, {label}, round {round_no}", times, "bwrap /bin/true", bases["bwrap"])
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda box: box.kill(), held))
        time.sleep(15)  # the pool refills between rounds, as it would between a planner's waves


def held_rows(options: argparse.Namespace, bases: dict[str, list[float]]) -> None:
    for label, pool_max in (("fixed pool of 2", "2"), ("pool follows demand", str(options.held))):
        stack = make_stack(
            {
                "E2B_POOL_SIZE": "2",
                "E2B_POOL_MAX": pool_max,
                "E2B_MAX_SANDBOXES": str(options.held * 2 + 10),
                "E2B_MEMORY_BUDGET_MB": str((options.held * 2 + 10) * 2048),
            }
        )
        try:
            stack.up(timeout=300)
            time.sleep(5)  # the floor fills
            measure_held(stack, options.held, bases, label)
        finally:
            stop_and_clean(stack)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--concurrent", type=int, default=50)
    parser.add_argument("--idle", type=int, default=200)
    parser.add_argument("--held", type=int, default=20)
    parser.add_argument("--held-only", action="store_true")
    parser.add_argument("--clients", type=int, default=4, help="clients of the sustained create+kill loop")
    parser.add_argument("--seconds", type=float, default=20, help="length of the sustained loop")
    parser.add_argument("--before", action="store_true", help="also the pool-off rows with E2B_ENVD_ZYGOTE=false")
    parser.add_argument(
        "--netns-ab",
        action="store_true",
        help="also the pool-off rows with E2B_NETNS_REUSE=false (a netns and veth made and destroyed per sandbox)",
    )
    parser.add_argument(
        "--before-templates",
        type=Path,
        help="the templates dir of the --before-tree run (an envd layer built from that tree)",
    )
    parser.add_argument("--skip-held", action="store_true")
    parser.add_argument("--cold-only", action="store_true", help="only the pool-off rows")
    parser.add_argument(
        "--before-tree",
        type=Path,
        help="a checkout of an older commit (git worktree add / git archive): its pool-off rows first, "
        "the stack run from its src/ (same-run baseline of a change)",
    )
    options = parser.parse_args()
    bases = {"fork": fork_exec_true(100), "bwrap": bwrap_true(50), "python": bwrap_python(30)}
    print(
        f"baselines: fork+exec /bin/true p50 {statistics.median(bases['fork']):.2f} ms, bwrap /bin/true p50 "
        f"{statistics.median(bases['bwrap']):.2f} ms, bwrap python3 -c pass p50 {statistics.median(bases['python']):.2f} ms",
        flush=True,
    )
    most = max(options.idle, options.concurrent) + 5
    # every sandbox of a burst must fit the memory budget (its default is the machine's memory)
    limits = {"E2B_MAX_SANDBOXES": str(most), "E2B_MEMORY_BUDGET_MB": str(most * 2048)}
    if options.before_tree:
        os.environ["PYTHONPATH"] = str(options.before_tree.resolve() / "src")
        templates = {"E2B_TEMPLATES_DIR": str(options.before_templates)} if options.before_templates else {}
        before = make_stack({"E2B_POOL_SIZE": "0", **limits, **templates})
        try:
            before.up(timeout=300)
            measure_cold(before, options, bases, label=f" (before: {options.before_tree})")
        finally:
            stop_and_clean(before)
            del os.environ["PYTHONPATH"]
    if options.before:
        before = make_stack({"E2B_POOL_SIZE": "0", "E2B_ENVD_ZYGOTE": "false", **limits})
        try:
            before.up(timeout=300)
            measure_cold(before, options, bases, label=" (envd not forked: before)", burst=False)
        finally:
            stop_and_clean(before)
    if options.netns_ab:
        before = make_stack({"E2B_POOL_SIZE": "0", "E2B_NETNS_REUSE": "false", **limits})
        try:
            before.up(timeout=300)
            measure_cold(before, options, bases, label=" (netns not reused: before)")
        finally:
            stop_and_clean(before)
    if not (options.skip_held or options.cold_only):
        held_rows(options, bases)
    if options.held_only:
        return 0
    if not options.cold_only:
        stack = make_stack({"E2B_POOL_SIZE": "2", **limits})
        try:
            stack.up(timeout=300)
            time.sleep(5)  # the pool fills in the background
            measure(stack, options, bases)
            count, rate = sustained(options.clients, options.seconds)
            print(
                f"sustained, default pool: {options.clients} clients create+kill for {options.seconds:.0f} s: "
                f"{count} creates, {rate:.1f} creates/s",
                flush=True,
            )
        finally:
            stop_and_clean(stack)
    stack = make_stack({"E2B_POOL_SIZE": "0", **limits})
    try:
        stack.up(timeout=300)
        measure_cold(stack, options, bases)
    finally:
        stop_and_clean(stack)
    return 0


if __name__ == "__main__":
    sys.exit(main())
