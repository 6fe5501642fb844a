"""What the tier benches measure through the stock SDKs, once: a tier is picked per create by the
metadata key ``e2b.isolation`` on one stack, so every tier and its ns baseline share the run."""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from measure import pct
from stack.harness import SHARED_TEMPLATES_DIR, link_shared_templates, make_stack, stop_and_clean

TIMEOUT = 600
STACK_ENV = {"E2B_SANDBOX_MEMORY_MB": "512", "E2B_SANDBOX_CPU_LIMIT": "1", "E2B_POOL_SIZE": "0"}


@contextlib.contextmanager
def tier_stack() -> Iterator[None]:
    """One stack up for every tier's rows, on its own link of the shared templates, with the SDK's
    environment pointing at it; stopped and checked clean afterwards."""
    templates = link_shared_templates(
        SHARED_TEMPLATES_DIR, Path(tempfile.mkdtemp(prefix="pmoves-e2b-bench-templates-")) / "templates"
    )
    stack = make_stack({**STACK_ENV, "E2B_TEMPLATES_DIR": str(templates)})
    try:
        stack.up()
        os.environ.update(stack.sdk_env)
        yield
    finally:
        stop_and_clean(stack)
        shutil.rmtree(templates.parent, ignore_errors=True)


def row(name: str, values: list[float], base_name: str = "", base: list[float] | None = None) -> None:
    p50 = statistics.median(values)
    text = f"{name:<48} p50 {p50 * 1000:8.1f} ms  p95 {pct(values, 0.95) * 1000:8.1f} ms  n={len(values)}"
    if base:
        text += f"   vs {base_name} p50 {statistics.median(base) * 1000:.1f} ms = {p50 / statistics.median(base):.2f}x"
    print(text, flush=True)


def create_kill(tier: str, runs: int) -> list[float]:
    from e2b import Sandbox

    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        sandbox = Sandbox.create(metadata={"e2b.isolation": tier}, request_timeout=TIMEOUT)
        samples.append(time.perf_counter() - started)
        sandbox.kill()
    return samples


def command_true(tier: str, runs: int, comm: bytes = b"") -> tuple[list[float], int]:
    """``commands.run("true")`` after a first warm one, and then the host PSS (kB) of the processes
    whose command line names the sandbox (``comm``: only those with that process name)."""
    from e2b import Sandbox

    sandbox = Sandbox.create(metadata={"e2b.isolation": tier}, request_timeout=TIMEOUT)
    try:
        sandbox.commands.run("true", request_timeout=TIMEOUT)
        samples = []
        for _ in range(runs):
            started = time.perf_counter()
            sandbox.commands.run("true", request_timeout=TIMEOUT)
            samples.append(time.perf_counter() - started)
        time.sleep(2)
        return samples, pss_kb(sandbox.sandbox_id, comm)
    finally:
        sandbox.kill()


def run_code(tier: str, runs: int) -> list[float]:
    from e2b_code_interpreter import Sandbox

    sandbox = Sandbox.create(metadata={"e2b.isolation": tier}, request_timeout=TIMEOUT, timeout=TIMEOUT)
    try:
        sandbox.run_code("1+1", timeout=TIMEOUT)
        samples = []
        for _ in range(runs):
            started = time.perf_counter()
            sandbox.run_code("1+1", timeout=TIMEOUT)
            samples.append(time.perf_counter() - started)
        return samples
    finally:
        sandbox.kill()


def pause_resume(tier: str, runs: int, mode: str | None = None) -> tuple[list[float], list[float]]:
    """``pause()`` (``mode="filesystem"``: to disk) and ``Sandbox.connect`` back, ``runs`` times."""
    from e2b import Sandbox

    sandbox = Sandbox.create(metadata={"e2b.isolation": tier}, request_timeout=TIMEOUT)
    pauses, resumes = [], []
    try:
        for _ in range(runs):
            started = time.perf_counter()
            if mode is None:
                sandbox.pause()
            else:
                sandbox.pause(mode=mode)  # type: ignore[arg-type]
            pauses.append(time.perf_counter() - started)
            started = time.perf_counter()
            Sandbox.connect(sandbox.sandbox_id, request_timeout=TIMEOUT)
            resumes.append(time.perf_counter() - started)
    finally:
        sandbox.kill()
    return pauses, resumes


def pss_kb(sandbox_id: str, comm: bytes = b"") -> int:
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if sandbox_id.encode() not in (entry / "cmdline").read_bytes():
                continue
            if comm and comm not in (entry / "comm").read_bytes():
                continue
            for line in (entry / "smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total
