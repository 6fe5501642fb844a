"""The microvm isolation tier through the stock `e2b` SDK, beside the ns tier of the same stack.

Run as root: ``.venv/bin/python bench/bench_microvm.py [--runs 8] [--boot-runs 3] [--command-runs 30]
[--code-runs 3] [--cold-code-runs 2] [--code-only]``.
Starts its own stacks (temp data dirs, free ports, pool off, 512 MB / 1 CPU sandboxes). Baselines
from the same run: the ns tier's ``Sandbox.create()`` and ``commands.run("true")``.

Prints: the first microvm create (boots a VM and saves it), creates restored from that saved VM,
creates that boot (``E2B_MICROVM_SNAPSHOTS=false``, a second stack), ``commands.run("true")`` in a
microvm sandbox, the host memory (PSS) of one idle VM, pause / resume (ns: freeze / thaw), and the
code interpreter (template ``code-interpreter-v1``): its first create (boots, starts the interpreter and
saves the VM with it running), creates restored from that warm VM, the first ``run_code("1+1")`` after
one and later ones, beside ns; and, on a second stack with ``E2B_MICROVM_WARM=false`` (the old path:
the saved VM has envd only, so each create starts the interpreter server and its default kernels in the
guest), its creates and run_code. ``--code-only`` runs the code-interpreter rows alone.
On the dev/CI machines the VM runs on TCG (KVM there is PVM and boots no stock kernel): every
number is the software CPU's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from stack.harness import make_stack, stop_and_clean  # noqa: E402
from tier_sdk import TIMEOUT, command_true, create_kill, pause_resume, row, run_code  # noqa: E402

STACK_ENV = {
    "E2B_SANDBOX_MEMORY_MB": "512",
    "E2B_SANDBOX_CPU_LIMIT": "1",
    "E2B_SANDBOX_DISK_MB": "1024",
    "E2B_POOL_SIZE": "0",
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--boot-runs", type=int, default=3)
    parser.add_argument("--command-runs", type=int, default=30)
    parser.add_argument("--pause-runs", type=int, default=5)
    parser.add_argument("--code-runs", type=int, default=3, help="code-interpreter creates per tier (0: none)")
    parser.add_argument(
        "--cold-code-runs", type=int, default=2, help="code-interpreter creates, E2B_MICROVM_WARM=false"
    )
    parser.add_argument("--code-only", action="store_true", help="only the code-interpreter rows")
    options = parser.parse_args()
    cache = Path(tempfile.mkdtemp(prefix="pmoves-e2b-bench-microvm-"))
    env = {**STACK_ENV, "E2B_MICROVM_CACHE_DIR": str(cache)}
    load = os.getloadavg()[0]
    print(f"load average at start: {load:.1f} (2 cores)", flush=True)
    stack = make_stack(env)
    try:
        stack.up()
        os.environ.update(stack.sdk_env)
        if not options.code_only:
            ns_create = create_kill("ns", options.runs)
            ns_command, _ = command_true("ns", options.command_runs)
            first = create_kill("microvm", 1)
            restored = create_kill("microvm", options.runs)
            vm_command, pss_kb = command_true("microvm", options.command_runs, comm=b"qemu")
            ns_pause, ns_resume = pause_resume("ns", options.pause_runs)
            vm_pause, vm_resume = pause_resume("microvm", options.pause_runs)
        if options.code_runs:
            ns_code_create, ns_first_cell = code_create(options.code_runs, "ns")
            vm_code_first, _ = code_create(1, "microvm")
            vm_code_create, vm_first_cell = code_create(options.code_runs, "microvm")
            ns_code = run_code("ns", options.command_runs)
            vm_code = run_code("microvm", options.command_runs)
    finally:
        stop_and_clean(stack)
    if options.code_runs and options.cold_code_runs:
        stack = make_stack({**env, "E2B_MICROVM_WARM": "false"})
        try:
            stack.up()
            os.environ.update(stack.sdk_env)
            code_create(1, "microvm")  # saves the envd-only VM
            cold_code_create, cold_first_cell = code_create(options.cold_code_runs, "microvm")
            cold_code = run_code("microvm", options.command_runs)
        finally:
            stop_and_clean(stack)
    if not options.code_only:
        row("ns: Sandbox.create() + kill (baseline)", ns_create)
        row("microvm: first create (boot + save the VM)", first)
        row("microvm: create restored from the saved VM", restored, "ns create", ns_create)
        row('ns: commands.run("true") (baseline)', ns_command)
        row('microvm: commands.run("true")', vm_command, "ns", ns_command)
        print(f"microvm: idle VM (512 MB guest) host PSS {pss_kb / 1024:.0f} MB", flush=True)
        row("ns: pause (cgroup freeze, baseline)", ns_pause)
        row("microvm: pause (VM saved to disk, QEMU ends)", vm_pause, "ns", ns_pause)
        row("ns: resume (Sandbox.connect, baseline)", ns_resume)
        row("microvm: resume (VM loaded from disk)", vm_resume, "ns", ns_resume)
    if options.code_runs:
        row("ns: code-interpreter create + kill (baseline)", ns_code_create)
        row("microvm: code-interpreter first create (boot + start + save warm)", vm_code_first)
        row("microvm: code-interpreter create, warm restore", vm_code_create, "ns", ns_code_create)
        if options.cold_code_runs:
            row("microvm: code-interpreter create, old path (restore + start)", cold_code_create, "ns", ns_code_create)
            row("microvm: warm restore vs old path", vm_code_create, "old path", cold_code_create)
        row('ns: first run_code("1+1") after create', ns_first_cell)
        row('microvm: first run_code("1+1") after a warm create', vm_first_cell, "ns", ns_first_cell)
        if options.cold_code_runs:
            row('microvm: first run_code("1+1") after an old-path create', cold_first_cell, "ns", ns_first_cell)
        row('ns: run_code("1+1") (baseline)', ns_code)
        row('microvm: run_code("1+1"), warm restore', vm_code, "ns", ns_code)
        if options.cold_code_runs:
            row('microvm: run_code("1+1"), old path', cold_code, "ns", ns_code)
    if options.boot_runs and not options.code_only:
        stack = make_stack({**env, "E2B_MICROVM_SNAPSHOTS": "false"})
        try:
            stack.up()
            os.environ.update(stack.sdk_env)
            booted = create_kill("microvm", options.boot_runs)
        finally:
            stop_and_clean(stack)
        row("microvm: create that boots (snapshots off)", booted, "restored", restored)
    print(f"load average at end: {os.getloadavg()[0]:.1f}", flush=True)
    shutil.rmtree(cache, ignore_errors=True)


def code_create(runs: int, tier: str) -> tuple[list[float], list[float]]:
    """``code-interpreter-v1`` creates (until the SDK returns) and the first ``run_code`` of each."""
    from e2b_code_interpreter import Sandbox

    creates, first_cells = [], []
    for _ in range(runs):
        started = time.perf_counter()
        sandbox = Sandbox.create(metadata={"e2b.isolation": tier}, request_timeout=TIMEOUT, timeout=TIMEOUT)
        creates.append(time.perf_counter() - started)
        try:
            started = time.perf_counter()
            sandbox.run_code("1+1", timeout=TIMEOUT)
            first_cells.append(time.perf_counter() - started)
        finally:
            sandbox.kill()
    return creates, first_cells


if __name__ == "__main__":
    main()
