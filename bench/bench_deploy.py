"""Containers vs host: `compose up` to all healthy, and sandbox create latency through the containerised
e2b-sandbox against the same on a host stack (`pmoves-e2b up`), both in this run, same template, no warm
pool (cold creates), creates one after another.

    python -m bench --only deploy --runs 15
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from deploy.compose_harness import SERVICES, ComposeStack, built_images, podman  # noqa: E402
from stack.harness import make_stack, stop_and_clean  # noqa: E402

from bench.measure import percentiles  # noqa: E402


def creates(env: dict[str, str], runs: int) -> list[float]:
    """Milliseconds of Sandbox.create (kill not timed), after one untimed create."""
    from e2b import Sandbox

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        samples = []
        for i in range(runs + 1):
            start = time.perf_counter()
            sandbox = Sandbox.create(timeout=120)
            elapsed = (time.perf_counter() - start) * 1000
            sandbox.commands.run("true")
            sandbox.kill()
            if i:
                samples.append(elapsed)
        return samples
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def report(label: str, samples: list[float]) -> float:
    p50, p95 = percentiles(samples)
    print(f"{label:<34} p50 {p50:7.1f} ms  p95 {p95:7.1f} ms  (n={len(samples)})")
    return p50


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    options = parser.parse_args()

    print(f"images/build.sh (cached when inputs are unchanged): {timed(built_images):.1f} s")
    for line in podman("image", "ls", "--format", "{{.Repository}}:{{.Tag}} {{.Size}}").stdout.splitlines():
        if "pmoves-e2b" in line:
            print(f"image {line}")

    compose = ComposeStack(("e2b",), {"E2B_POOL_SIZE": "0"})
    try:
        start = time.perf_counter()
        compose.up()
        compose.wait_healthy(SERVICES)
        print(f"compose --profile e2b up -> 5 healthy: {time.perf_counter() - start:.1f} s")
        in_container = report("create, containerised e2b-sandbox", creates(compose.sdk_env, options.runs))
    finally:
        compose.cleanup()

    host = make_stack({"E2B_POOL_SIZE": "0"})
    try:
        host.up()
        on_host = report("create, e2b-sandbox on the host", creates(host.sdk_env, options.runs))
    finally:
        stop_and_clean(host)
    print(f"container / host (p50): {in_container / on_host:.2f}")


if __name__ == "__main__":
    main()
