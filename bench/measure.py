"""Helpers every bench shares: samples in milliseconds, percentiles, interleaving, the bwrap baseline."""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable


def bwrap_argv(root: str) -> list[str]:
    """bwrap with ``root`` read-only as / and every namespace unshared: the baseline sandbox."""
    return ["/usr/bin/bwrap", "--ro-bind", root, "/", "--proc", "/proc", "--dev", "/dev", "--unshare-all"]


def pct(values: list[float], q: float) -> float:
    """The q-quantile by nearest rank (q=0.95 for p95)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def percentiles(samples: list[float]) -> tuple[float, float]:
    """(p50, p95)."""
    return statistics.median(samples), pct(samples, 0.95)


def timed(action: Callable[[], object], runs: int, warmup: int = 0) -> list[float]:
    """Milliseconds per call of ``action``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        action()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        action()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


async def timed_interleaved(
    actions: dict[str, Callable[[], Awaitable[object]]], runs: int, warmup: int = 2
) -> dict[str, list[float]]:
    """Round-robin over the actions so load from other processes hits all of them alike."""
    for _ in range(warmup):
        for action in actions.values():
            await action()
    samples: dict[str, list[float]] = {name: [] for name in actions}
    for _ in range(runs):
        for name, action in actions.items():
            started = time.perf_counter()
            await action()
            samples[name].append((time.perf_counter() - started) * 1000)
    return samples


def report_baseline(name: str, baseline: list[float]) -> None:
    p50, p95 = percentiles(baseline)
    print(f"{'baseline: ' + name:46s} p50 {p50:8.2f} ms  p95 {p95:8.2f} ms", flush=True)


def report(name: str, values: list[float], baseline: list[float]) -> None:
    """One measured row next to the baseline of the same run: p50, p95 and the p50 ratio."""
    p50, p95 = percentiles(values)
    print(
        f"{name:46s} p50 {p50:8.2f} ms  p95 {p95:8.2f} ms   ratio to baseline {p50 / statistics.median(baseline):6.2f}x",
        flush=True,
    )
