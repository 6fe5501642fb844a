"""A change's effect on creates, with the machine's load spread evenly over before and after.

Run as root: ``.venv/bin/python bench/bench_before_after.py BEFORE_TREE [--runs 20] [--windows 2] [--bursts 2]``
where BEFORE_TREE is a checkout of the older commit (``git worktree add`` or ``git archive | tar -x``).
Two stacks run at once, "before" from BEFORE_TREE/src and "after" from this tree, both with the pool
off (``--before-templates DIR``: "before" on other templates, e.g. the older commit's envd layer).
Creates alternate between them (order flipped each round), so load from other processes on a
shared machine hits both alike: sequential ``Sandbox.create()`` p50/p95; 4 clients in a create+kill
loop in alternating 8 s windows (creates/s and the CPU ms per create+kill of every process involved,
see bench_sdk.cpu_snapshot); alternating bursts of 50 concurrent creates (p99, p50). Prints the
ratio after/before and the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_sdk import cpu_snapshot, sustained  # noqa: E402
from measure import pct  # noqa: E402
from stack.harness import make_stack, stop_and_clean  # noqa: E402

NAMES = ("before", "after")


def rounds(index: int) -> tuple[str, str]:
    return NAMES if index % 2 == 0 else (NAMES[1], NAMES[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("before_tree", type=Path)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--bursts", type=int, default=2)
    parser.add_argument("--concurrent", type=int, default=50)
    parser.add_argument(
        "--before-templates", type=Path, help="templates dir of 'before' (a change to envd: its older envd layer)"
    )
    options = parser.parse_args()
    from e2b import Sandbox

    most = options.concurrent + 10
    limits = {"E2B_POOL_SIZE": "0", "E2B_MAX_SANDBOXES": str(most), "E2B_MEMORY_BUDGET_MB": str(most * 2048)}
    stacks = {}
    try:
        os.environ["PYTHONPATH"] = str(options.before_tree.resolve() / "src")
        own = {"E2B_TEMPLATES_DIR": str(options.before_templates)} if options.before_templates else {}
        stacks["before"] = make_stack({**limits, **own})
        stacks["before"].up(timeout=300)
        del os.environ["PYTHONPATH"]
        stacks["after"] = make_stack(limits)
        stacks["after"].up(timeout=300)

        def use(name: str) -> None:
            os.environ.update(stacks[name].sdk_env)

        for name in NAMES:
            use(name)
            for _ in range(3):
                Sandbox.create(timeout=60).kill()
        latencies: dict[str, list[float]] = {name: [] for name in NAMES}
        for i in range(options.runs):
            for name in rounds(i):
                use(name)
                started = time.perf_counter()
                sandbox = Sandbox.create(timeout=60)
                latencies[name].append((time.perf_counter() - started) * 1000)
                sandbox.kill()
                time.sleep(0.05)
        p50 = {name: statistics.median(values) for name, values in latencies.items()}
        print(
            f"sequential create, pool off (n={options.runs} each, interleaved): "
            + ", ".join(f"{name} p50 {p50[name]:.1f} ms p95 {pct(latencies[name], 0.95):.0f} ms" for name in NAMES)
            + f"; after/before {p50['after'] / p50['before']:.2f}; load {os.getloadavg()[0]:.1f}",
            flush=True,
        )

        counts, seconds, cpu = dict.fromkeys(NAMES, 0), dict.fromkeys(NAMES, 0.0), dict.fromkeys(NAMES, 0.0)
        parts: dict[str, dict[str, float]] = {name: {} for name in NAMES}  # CPU ms by process
        for window in range(options.windows):
            for name in rounds(window):
                use(name)
                first, started = cpu_snapshot(stacks[name]), time.perf_counter()
                count, _ = sustained(4, 8)
                seconds[name] += time.perf_counter() - started
                counts[name] += count
                time.sleep(2)  # the last teardowns
                last = cpu_snapshot(stacks[name])
                cpu[name] += sum(last[key] - first[key] for key in first if key != "machine busy (all users)")
                for key in first:
                    parts[name][key] = parts[name].get(key, 0.0) + last[key] - first[key]
        rates = {name: counts[name] / seconds[name] for name in NAMES}
        per = {name: cpu[name] / max(1, counts[name]) for name in NAMES}
        print(
            "sustained, 4 clients create+kill (alternating 8 s windows): "
            + ", ".join(f"{name} {rates[name]:.1f}/s, {per[name]:.1f} CPU ms per create+kill" for name in NAMES)
            + f"; after/before rate {rates['after'] / max(rates['before'], 1e-9):.2f},"
            f" CPU {per['after'] / max(per['before'], 1e-9):.2f}; load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        for name in NAMES:
            split = ", ".join(f"{key} {value / max(1, counts[name]):.1f}" for key, value in parts[name].items())
            print(f"  {name}: CPU ms per create+kill by process: {split}", flush=True)

        bursts: dict[str, list[tuple[float, float]]] = {name: [] for name in NAMES}
        for burst in range(options.bursts):
            for name in rounds(burst):
                use(name)
                time.sleep(2)

                def one(_: int) -> tuple[float, str]:
                    started = time.perf_counter()
                    box = Sandbox.create(timeout=300)
                    return (time.perf_counter() - started) * 1000, box.sandbox_id

                with ThreadPoolExecutor(max_workers=options.concurrent) as pool:
                    results = list(pool.map(one, range(options.concurrent)))
                times = [result[0] for result in results]
                bursts[name].append((pct(times, 0.99), statistics.median(times)))
                with ThreadPoolExecutor(max_workers=16) as pool:
                    list(pool.map(lambda result: Sandbox.kill(result[1]), results))
        print(
            f"{options.concurrent} concurrent creates, all succeeded (alternating bursts): "
            + ", ".join(
                f"{name} p99 {'/'.join(f'{b[0]:.0f}' for b in bursts[name])} ms"
                f" (p50 {'/'.join(f'{b[1]:.0f}' for b in bursts[name])})"
                for name in NAMES
            )
            + f"; load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
    finally:
        for stack in stacks.values():
            stop_and_clean(stack)
    return 0


if __name__ == "__main__":
    sys.exit(main())
