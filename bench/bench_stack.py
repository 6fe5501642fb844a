"""The stack: `up` until healthy, health latency, restart after a crash, `down`.

Run: ``.venv/bin/python bench/bench_stack.py [--requests N]``. A stack without warm pool runs on
free ports in a temp data dir. Baselines from the same run: starting one bare uvicorn app with a
JSON route (what any of our services costs at least), and that app's latency for the same GET.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from stack.harness import clean_environ, free_ports, make_stack, stop_and_clean  # noqa: E402

BARE_APP = textwrap.dedent(
    """
    import sys, uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    async def health(_):
        return JSONResponse({"status": "healthy"})
    app = Starlette(routes=[Route("/health", health)])
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", http="httptools")
    """
)


def wait_ok(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.01)
    raise TimeoutError(url)


def latency_ms(url: str, requests: int) -> float:
    with httpx.Client(timeout=5) as client:
        client.get(url)
        samples = []
        for _ in range(requests):
            started = time.perf_counter()
            client.get(url).raise_for_status()
            samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def bare_app(requests: int) -> tuple[float, float]:
    port = free_ports(1)[0]
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-c", BARE_APP, str(port)], env=clean_environ())
    try:
        wait_ok(f"http://127.0.0.1:{port}/health")
        start_s = time.monotonic() - started
        return start_s, latency_ms(f"http://127.0.0.1:{port}/health", requests)
    finally:
        process.terminate()
        process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=300)
    options = parser.parse_args()
    base_start, base_latency = bare_app(options.requests)
    stack = make_stack({"E2B_POOL_SIZE": "0"})
    try:
        started = time.monotonic()
        stack.up()
        up_s = time.monotonic() - started
        latency = latency_ms(stack.desktop_url + "/health", options.requests)

        old = stack.service_pid("desktop")
        assert old is not None
        started = time.monotonic()
        os.kill(old, signal.SIGKILL)
        while stack.service_pid("desktop") in (None, old):
            time.sleep(0.01)
        wait_ok(stack.desktop_url + "/health")
        restart_s = time.monotonic() - started

        started = time.monotonic()
        stack.down()
        down_s = time.monotonic() - started
    finally:
        stop_and_clean(stack)
    print(
        f"up until 5 components healthy             : {up_s:6.2f} s   baseline one bare uvicorn app: {base_start:5.2f} s"
        f"   ratio {up_s / base_start:4.1f}x"
    )
    print(
        f"restart after SIGKILL (incl. 0.5 s backoff): {restart_s:6.2f} s   baseline one bare uvicorn app: {base_start:5.2f} s"
        f"   ratio {restart_s / base_start:4.1f}x"
    )
    print(f"down                                      : {down_s:6.2f} s")
    print(
        f"GET /health median                        : {latency:6.2f} ms  baseline bare JSON route     : {base_latency:5.2f} ms"
        f"  ratio {latency / base_latency:4.1f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
