"""A dead envd, through the stock `e2b` SDK (issue 11 item 3).

Run as root: ``.venv/bin/python bench/bench_envd_restart.py [--runs 10] [--deaths 3]``.
Starts its own stack (temp data dir, free ports, no warm pool).

Prints: how long after ``kill -9`` of envd a command runs again (the launcher restarts it) against
a fresh ``Sandbox.create()`` of the same run (what a user would do without the restart) and the
``commands.run('true')`` round trip; how long until the API stops listing a sandbox whose envd
is gone for good while a command lives on, against the manager's 5 s check interval; the memory
the launcher costs per sandbox against envd's own.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from measure import pct, timed  # noqa: E402
from stack.harness import make_stack, stop_and_clean  # noqa: E402

ENVD = "^/usr/bin/python3 -m pmoves_e2b.envd"
LAUNCHER = "^/bin/sh /opt/pmoves/bin/envd"
CHECK_INTERVAL_MS = 5000.0  # SandboxManager._sampler


def line(name: str, values: list[float], base_name: str, base: list[float]) -> None:
    p50, p95, b50 = statistics.median(values), pct(values, 0.95), statistics.median(base)
    print(
        f"{name:44s} p50 {p50:8.1f} ms  p95 {p95:8.1f} ms   baseline {base_name} p50 {b50:8.1f} ms"
        f"   ratio {p50 / b50:6.2f}x",
        flush=True,
    )


def pss_kb(pattern: str) -> list[int]:
    """PSS of every host process whose command line starts with ``pattern`` (without its ^)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if not (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().startswith(pattern[1:]):
                continue
            rows = (entry / "smaps_rollup").read_text().splitlines()
        except OSError:
            continue
        found.extend(int(row.split()[1]) for row in rows if row.startswith("Pss:"))
    return found


def restart_ms(sbx) -> float:  # type: ignore[no-untyped-def]
    """Kill envd from a detached shell, then run a command until one runs: sandbox clock to clock."""
    kill = f'sleep 0.2; date +%s.%N > /tmp/killed-at; pkill -9 -f "{ENVD}"'
    sbx.commands.run(f"nohup sh -c '{kill}' >/dev/null 2>&1 &", user="root", timeout=30)
    time.sleep(0.2)
    deadline = time.monotonic() + 60
    while True:
        try:
            out = sbx.commands.run("date +%s.%N; cat /tmp/killed-at", timeout=5, request_timeout=5).stdout
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
            continue
        ran_at, killed_at = (float(v) for v in out.split())
        if ran_at > killed_at:
            return (ran_at - killed_at) * 1000
        time.sleep(0.01)  # ran before the kill landed


def measure(options: argparse.Namespace) -> None:
    from e2b import Sandbox

    cold, restarts, round_trip = [], [], []
    launcher: list[int] = []
    envd: list[int] = []
    for _ in range(options.runs):  # a fresh sandbox each: the launcher gives up after 3 quick deaths
        started = time.perf_counter()
        sbx = Sandbox.create(timeout=120)
        cold.append((time.perf_counter() - started) * 1000)
        try:
            sbx.commands.run("true")
            round_trip.extend(timed(lambda: sbx.commands.run("true"), 5))  # noqa: B023 - runs now
            launcher, envd = launcher + pss_kb(LAUNCHER), envd + pss_kb(ENVD)
            restarts.append(restart_ms(sbx))
        finally:
            sbx.kill()
    line(f"kill -9 envd -> a command runs (n={options.runs})", restarts, "Sandbox.create()", cold)
    line("", restarts, "commands.run('true')", round_trip)
    print(
        f"launcher memory per sandbox: PSS p50 {statistics.median(launcher):.0f} kB"
        f"   baseline envd PSS p50 {statistics.median(envd):.0f} kB"
        f"   ratio {statistics.median(launcher) / statistics.median(envd):.3f}x",
        flush=True,
    )

    found = []
    for _ in range(options.deaths):
        box = Sandbox.create(timeout=300)
        attack = f'sleep 600 & kill -9 $(pgrep -f "{LAUNCHER}"); sleep 0.2; kill -9 $(pgrep -f "{ENVD}")'
        box.commands.run(f"nohup sh -c '{attack}' >/dev/null 2>&1 &", user="root", timeout=30)
        started = time.perf_counter()
        while any(info.sandbox_id == box.sandbox_id for info in Sandbox.list(limit=100).next_items()):
            time.sleep(0.1)
        found.append((time.perf_counter() - started) * 1000)
    line(f"envd gone for good -> unlisted (n={options.deaths})", found, "check interval", [CHECK_INTERVAL_MS])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--deaths", type=int, default=3)
    options = parser.parse_args()
    stack = make_stack({"E2B_POOL_SIZE": "0"})
    try:
        stack.up(timeout=300)
        os.environ.update(stack.sdk_env)
        measure(options)
    finally:
        stop_and_clean(stack)
    return 0


if __name__ == "__main__":
    sys.exit(main())
