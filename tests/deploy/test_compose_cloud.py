"""Cloud mode of deploy/compose.yaml: profiles ui + agents with E2B_SANDBOX_URL=https://api.e2b.dev run the
upper three (and NATS) without e2b-sandbox. This machine has no internet, so E2B's cloud is unreachable:
each service answers its health with 503 naming exactly that dependency, NATS connected."""

from __future__ import annotations

import time

import httpx
import pytest

from deploy.compose_harness import ComposeStack, built_images

pytestmark = pytest.mark.slow

HEALTH = {"e2b-mcp-server": "/healthz", "e2b-surf": "/api/health", "e2b-desktop": "/health"}


def health(port: int, path: str, timeout: float = 90) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        try:
            answer = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5)
            if answer.json()["dependencies"].get("nats") == "connected":
                return answer
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"no health answer with NATS connected on {port}{path}")
        time.sleep(0.3)


def test_cloud_mode_runs_the_upper_three_without_e2b_sandbox() -> None:
    built_images()
    stack = ComposeStack(("ui", "agents"), {"E2B_SANDBOX_URL": "https://api.e2b.dev"})
    try:
        stack.up()
        containers = stack.containers()
        assert set(containers) == {"nats", *HEALTH}
        for name, path in HEALTH.items():
            env = dict(item.split("=", 1) for item in containers[name]["Config"]["Env"])
            assert env["E2B_SANDBOX_URL"] == "https://api.e2b.dev", name
            answer = health(stack.ports[name], path)
            assert answer.status_code == 503 and answer.json()["dependencies"]["sandbox_backend"] == "unavailable"
    finally:
        stack.cleanup()
    assert stack.containers() == {}
