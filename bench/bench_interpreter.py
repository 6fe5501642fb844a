"""The code interpreter server: ``run_code("1+1")`` round trip, against the kernel driven directly.

Run: ``.venv/bin/python bench/bench_interpreter.py [--runs 300] [--stack]``.
Baseline from the same run: a local ipykernel (the same kernelspec) driven directly with
jupyter_client, execute "1+1" until idle + execute_reply. Then the same cell through the server,
once with the stock SDK (``Sandbox.run_code`` in debug mode, what users see) and once with a bare
httpx client (the server's own share). Also: server start to healthy (default Python kernel warm)
and the idle memory (PSS) of the server plus its kernel.

``--stack`` (root, templates built) also starts the whole stack twice, with a warm pool of one
and without, and measures on code-interpreter-v1 sandboxes: create to first ``run_code`` result,
``run_code("1+1")`` through the proxy into the sandbox, and the idle PSS of a sandbox.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
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
from measure import percentiles, timed

from pmoves_e2b.interpreter.kernelspecs_install import install

CELL = "1+1"


class DirectKernel:
    """The baseline: the same kernelspec driven directly with jupyter_client, on its own loop."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._manager = AsyncKernelManager(kernel_name="python3")
        self._loop.run_until_complete(self._manager.start_kernel())
        self._client = self._manager.client()
        self._client.start_channels()
        self._loop.run_until_complete(self._client.wait_for_ready(timeout=60))

    async def _execute(self) -> None:
        msg_id = self._client.execute(CELL, allow_stdin=False)
        idle = replied = False
        while not idle:
            msg = await self._client.get_iopub_msg()
            if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "status":
                idle = msg["content"]["execution_state"] == "idle"
        while not replied:
            reply = await self._client.get_shell_msg()
            replied = reply["parent_header"].get("msg_id") == msg_id

    def execute(self) -> None:
        self._loop.run_until_complete(self._execute())

    def close(self) -> None:
        self._client.stop_channels()
        self._loop.run_until_complete(self._manager.shutdown_kernel(now=True))
        self._loop.close()


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


def start_server(root: Path) -> tuple[subprocess.Popen[bytes], str, float]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pmoves_e2b.interpreter",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--cwd",
            str(root / "home"),
            "--envd-url",
            "",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return server, url, (time.perf_counter() - started) * 1000
        except httpx.TransportError:
            if time.monotonic() > deadline or server.poll() is not None:
                stop_server(server)
                raise SystemExit("interpreter server did not become healthy") from None
        time.sleep(0.02)


def stop_server(server: subprocess.Popen[bytes]) -> None:
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def sandbox_pss_kib(sandbox_id: str) -> tuple[int, int]:
    """(PSS in KiB, process count) of a sandbox: its bwrap process (named by the id) and below."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"bwrap") and any(sandbox_id.encode() in arg for arg in argv):
            tree = process_tree(int(entry.name))
            return sum(pss_kib(pid) for pid in tree), len(tree)
    return 0, 0


def bench_stack(runs: int, creates: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from stack.harness import make_stack, stop_and_clean

    for pool_size in ("1", "0"):
        stack = make_stack({"E2B_POOL_SIZE": pool_size})
        try:
            stack.up()
            params = {"api_key": stack.api_key, "api_url": stack.sandbox_url, "sandbox_url": stack.sandbox_url}
            samples = []
            for _ in range(creates):
                if pool_size != "0":
                    time.sleep(10)  # let the pool refill: each create should take a warm sandbox
                start = time.perf_counter()
                box = Sandbox.create(timeout=300, **params)
                assert box.run_code(CELL).text == "2"
                samples.append((time.perf_counter() - start) * 1000)
                box.kill()
            label = "warm pool of 1" if pool_size != "0" else "no pool"
            report(f"stack ({label}): create -> first result", samples)
            if pool_size == "0":
                held = Sandbox.create(timeout=300, **params)
                box = held
                try:
                    report(
                        "stack: run_code via proxy into the sandbox",
                        timed(functools.partial(held.run_code, CELL), runs, warmup=20),
                    )
                    time.sleep(2)
                    kib, count = sandbox_pss_kib(box.sandbox_id)
                    print(f"idle PSS of a code-interpreter-v1 sandbox     {kib / 1024:7.1f} MiB ({count} processes)")
                finally:
                    box.kill()
        finally:
            stop_and_clean(stack)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300, help="samples per variant")
    parser.add_argument("--rounds", type=int, default=5, help="variants alternate this many times")
    parser.add_argument("--stack", action="store_true", help="also measure code-interpreter-v1 on the stack")
    parser.add_argument("--creates", type=int, default=5, help="sandbox creates per stack variant")
    args = parser.parse_args()
    per_round = max(1, args.runs // args.rounds)

    with tempfile.TemporaryDirectory(prefix="bench-interpreter-") as tmp:
        root = Path(tmp)
        install(root / "prefix")
        (root / "home").mkdir()
        os.environ["JUPYTER_PATH"] = str(root / "prefix" / "share" / "jupyter")
        os.environ.pop("MPLBACKEND", None)

        server, url, healthy_ms = start_server(root)
        direct = DirectKernel()
        try:
            sandbox = Sandbox.create(debug=True, sandbox_url=url, api_key="bench")
            first = time.perf_counter()
            assert sandbox.run_code(CELL).text == "2"
            first_ms = (time.perf_counter() - first) * 1000
            body = {"code": CELL, "context_id": None, "language": None, "env_vars": None}
            with httpx.Client() as client:

                def raw_run() -> None:
                    with client.stream("POST", f"{url}/execute", json=body) as response:
                        for _ in response.iter_lines():
                            pass

                variants: dict[str, Callable[[], object]] = {
                    "baseline: ipykernel via jupyter_client": direct.execute,
                    "server: stock SDK Sandbox.run_code": lambda: sandbox.run_code(CELL),
                    "server: bare httpx POST /execute": raw_run,
                }
                samples: dict[str, list[float]] = {name: [] for name in variants}
                # Alternate the variants so that load from other jobs hits them alike.
                for _ in range(args.rounds):
                    for name, action in variants.items():
                        samples[name] += timed(action, per_round, warmup=5)

            baseline_p50 = statistics.median(samples["baseline: ipykernel via jupyter_client"])
            for name, values in samples.items():
                report(name, values, None if name.startswith("baseline") else baseline_p50)

            time.sleep(1)
            tree = process_tree(server.pid)
            total_kib = sum(pss_kib(pid) for pid in tree)
            print(f"server start to healthy (python kernel warm)  {healthy_ms:7.0f} ms")
            print(f"first run_code after healthy                  {first_ms:7.1f} ms")
            print(f"idle PSS, server + default python kernel      {total_kib / 1024:7.1f} MiB ({len(tree)} processes)")
        finally:
            direct.close()
            stop_server(server)
    if args.stack:
        bench_stack(args.runs, args.creates)


if __name__ == "__main__":
    main()
