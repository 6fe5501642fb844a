"""How soon a service's NATS connection is back after nats-server returns (issue 11: "well under a second").

Run: ``.venv/bin/python bench/bench_nats_reconnect.py [--runs 10]``. Starts the embedded
nats-server with the supervisor's arguments (temp data dir, free ports), connects as e2b-sandbox
through ``events.connection`` (the services' client), then stops and restarts the server and times
from "server answers /healthz" to "connection is back". Baseline from the same run: a fresh
``nats.connect`` to the restarted server.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import nats

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from measure import pct  # noqa: E402
from stack.harness import free_ports  # noqa: E402

from pmoves_e2b.config import Settings, load_settings  # noqa: E402
from pmoves_e2b.events.connection import connect  # noqa: E402
from pmoves_e2b.events.embedded import client_url, server_args  # noqa: E402


def start_server(settings: Settings) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(server_args(settings), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{settings.e2b_nats_monitor_port}/healthz", timeout=0.5).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.01)
    raise RuntimeError("nats-server did not start")


async def scenario(settings: Settings, runs: int) -> tuple[list[float], list[float]]:
    connection = connect(settings, "e2b-sandbox")
    server = await asyncio.to_thread(start_server, settings)
    connection.start()
    back, fresh = [], []
    try:
        if not await connection.wait_connected(timeout=10):
            raise RuntimeError("did not connect")
        for _ in range(runs):
            server.terminate()
            server.wait(timeout=10)
            while connection.connected:
                await asyncio.sleep(0.01)
            await asyncio.sleep(1.0)  # the server is away for a while
            server = await asyncio.to_thread(start_server, settings)
            returned = time.perf_counter()
            while not connection.connected:
                await asyncio.sleep(0.005)
            back.append((time.perf_counter() - returned) * 1000)
            started = time.perf_counter()
            client = await nats.connect(client_url(settings, "e2b-sandbox"), allow_reconnect=False)
            fresh.append((time.perf_counter() - started) * 1000)
            await client.close()
    finally:
        await connection.close()
        server.terminate()
        server.wait(timeout=10)
    return back, fresh


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as data_dir:
        port, monitor = free_ports(2)
        settings = load_settings(
            e2b_data_dir=Path(data_dir),
            e2b_nats_port=port,
            e2b_nats_monitor_port=monitor,
            e2b_nats_password=secrets.token_hex(16),
        )
        settings.nats_store_dir.mkdir(parents=True, exist_ok=True)
        back, fresh = asyncio.run(scenario(settings, options.runs))
    p50, base = statistics.median(back), statistics.median(fresh)
    print(
        f"NATS connection back after the server returned (n={options.runs}): p50 {p50:.0f} ms, max {max(back):.0f} ms,"
        f" p95 {pct(back, 0.95):.0f} ms   baseline fresh nats.connect p50 {base:.1f} ms   ratio {p50 / base:.1f}x",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
