"""The code interpreter server: ``run_code("1+1")`` round trip, against the kernel driven directly.

Run: ``.venv/bin/python bench/bench_interpreter.py [--runs 200]``.
Baseline from the same run: a local ipykernel (the same kernelspec) driven directly with
jupyter_client, execute "1+1" until idle + execute_reply. Then the same cell through the server,
once with the stock SDK (``Sandbox.run_code`` in debug mode, what users see) and once with a bare
httpx client (the server's own share). Also: server start to healthy (default Python kernel warm)
and the idle memory (PSS) of the server plus its kernel.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from e2b_code_interpreter import Sandbox
from jupyter_client.manager import AsyncKernelManager

from pmoves_e2b.interpreter.kernelspecs_install import install

CELL = "1+1"


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[round(0.95 * (len(ordered) - 1))]


def timed(action: Callable[[], object], runs: int, warmup: int = 20) -> list[float]:
    for _ in range(warmup):
        action()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        action()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


async def direct_kernel_samples(runs: int, warmup: int = 20) -> list[float]:
    manager = AsyncKernelManager(kernel_name="python3")
    await manager.start_kernel()
    client = manager.client()
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=60)
        samples = []
        for index in range(warmup + runs):
            start = time.perf_counter()
            msg_id = client.execute(CELL, allow_stdin=False)
            idle = replied = False
            while not (idle and replied):
                if not idle:
                    msg = await client.get_iopub_msg()
                    if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "status":
                        idle = msg["content"]["execution_state"] == "idle"
                else:
                    reply = await client.get_shell_msg()
                    replied = reply["parent_header"].get("msg_id") == msg_id
            if index >= warmup:
                samples.append((time.perf_counter() - start) * 1000)
        return samples
    finally:
        client.stop_channels()
        await manager.shutdown_kernel(now=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def process_tree(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [pid], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        tree += children
        todo += children
    return tree


def report(name: str, samples: list[float], baseline_p50: float | None = None) -> None:
    p50, p95 = percentiles(samples)
    ratio = f"  ratio p50 {p50 / baseline_p50:.2f}x" if baseline_p50 else ""
    print(f"{name:<44} p50 {p50:7.2f} ms  p95 {p95:7.2f} ms{ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-interpreter-") as tmp:
        root = Path(tmp)
        install(root / "prefix")
        (root / "home").mkdir()
        os.environ["JUPYTER_PATH"] = str(root / "prefix" / "share" / "jupyter")
        os.environ.pop("MPLBACKEND", None)

        baseline = asyncio.run(direct_kernel_samples(args.runs))
        report("baseline: ipykernel via jupyter_client", baseline)

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        started = time.perf_counter()
        server = subprocess.Popen(
            [sys.executable, "-m", "pmoves_e2b.interpreter", "--host", "127.0.0.1", "--port", str(port),
             "--cwd", str(root / "home"), "--envd-url", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 90
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise SystemExit("interpreter server did not become healthy") from None
                time.sleep(0.02)
            healthy_ms = (time.perf_counter() - started) * 1000

            sandbox = Sandbox.create(debug=True, sandbox_url=url, api_key="bench")
            first = time.perf_counter()
            assert sandbox.run_code(CELL).text == "2"
            first_ms = (time.perf_counter() - first) * 1000

            def sdk_run() -> None:
                sandbox.run_code(CELL)

            report("server: stock SDK Sandbox.run_code", timed(sdk_run, args.runs), statistics.median(baseline))

            with httpx.Client() as client:
                body = {"code": CELL, "context_id": None, "language": None, "env_vars": None}

                def raw_run() -> None:
                    with client.stream("POST", f"{url}/execute", json=body) as response:
                        for _ in response.iter_lines():
                            pass

                report("server: bare httpx POST /execute", timed(raw_run, args.runs), statistics.median(baseline))

            time.sleep(1)
            tree = process_tree(server.pid)
            total_kib = sum(pss_kib(pid) for pid in tree)
            print(f"server start to healthy (python kernel warm)  {healthy_ms:7.0f} ms")
            print(f"first run_code after healthy                  {first_ms:7.1f} ms")
            print(f"idle PSS, server + default python kernel      {total_kib / 1024:7.1f} MiB ({len(tree)} processes)")
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


if __name__ == "__main__":
    main()
