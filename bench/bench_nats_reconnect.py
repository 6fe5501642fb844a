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
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nats

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from events.embedded_nats import EmbeddedNats  # noqa: E402
from measure import pct  # noqa: E402

from pmoves_e2b.events.connection import connect  # noqa: E402
from pmoves_e2b.events.embedded import client_url  # noqa: E402


async def scenario(server: EmbeddedNats, runs: int) -> tuple[list[float], list[float]]:
    settings = server.settings
    connection = connect(settings, "e2b-sandbox")
    await asyncio.to_thread(server.start)
    connection.start()
    back, fresh = [], []
    try:
        if not await connection.wait_connected(timeout=10):
            raise RuntimeError("did not connect")
        for _ in range(runs):
            server.stop()
            while connection.connected:
                await asyncio.sleep(0.01)
            await asyncio.sleep(1.0)  # the server is away for a while
            await asyncio.to_thread(server.start)
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
        server.stop()
    return back, fresh


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as data_dir:
        back, fresh = asyncio.run(scenario(EmbeddedNats(Path(data_dir)), options.runs))
    p50, base = statistics.median(back), statistics.median(fresh)
    print(
        f"NATS connection back after the server returned (n={options.runs}): p50 {p50:.0f} ms, max {max(back):.0f} ms,"
        f" p95 {pct(back, 0.95):.0f} ms   baseline fresh nats.connect p50 {base:.1f} ms   ratio {p50 / base:.1f}x",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
