"""Many sandboxes at once, restart safety, host routing over TLS, and an older SDK generation."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from e2b import Sandbox

pytestmark = pytest.mark.stack

OLD_SDK = "e2b==2.20.0"
OLD_SDK_VENV = Path("/var/cache/pmoves-e2b/venv-e2b-2.20.0")


def test_twenty_sandboxes_at_once(sdk_env: dict[str, str]) -> None:
    with ThreadPoolExecutor(max_workers=10) as pool:
        boxes = list(pool.map(lambda _: Sandbox.create(timeout=120), range(20)))
    try:
        assert len({b.sandbox_id for b in boxes}) == 20
        outputs = list(
            ThreadPoolExecutor(max_workers=10).map(lambda b: b.commands.run("hostname; echo ok").stdout, boxes)
        )
        assert all(out.endswith("ok\n") for out in outputs)
    finally:
        with ThreadPoolExecutor(max_workers=10) as pool:
            list(pool.map(lambda b: b.kill(), boxes))


def test_sandboxes_survive_a_sigkill_of_the_service(running_stack, sdk_env: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    sbx = Sandbox.create(timeout=300)
    try:
        sbx.files.write("/home/user/before.txt", "still here")
        background = sbx.commands.run("sleep 600", background=True)
        old_pid = running_stack.service_pid("sandbox")
        os.kill(old_pid, signal.SIGKILL)
        running_stack.wait_healthy("sandbox", timeout=60)
        assert running_stack.service_pid("sandbox") != old_pid
        again = Sandbox.connect(sbx.sandbox_id)
        assert again.files.read("/home/user/before.txt") == "still here"
        assert background.pid in {p.pid for p in again.commands.list()}
        assert again.commands.run("echo after restart").stdout == "after restart\n"
        assert sbx.sandbox_id in {s.sandbox_id for s in Sandbox.list().next_items()}
    finally:
        Sandbox.kill(sbx.sandbox_id)


def test_host_routing_over_tls_without_deprecated_options(running_stack) -> None:  # type: ignore[no-untyped-def]
    """E2B_DOMAIN=e2b.localhost:<tls port> + SSL_CERT_FILE, in a fresh process (env read at import)."""
    script = textwrap.dedent(
        """
        from e2b import Sandbox
        sbx = Sandbox.create(timeout=60)
        try:
            print(sbx.commands.run("echo over-tls").stdout.strip())
            sbx.files.write("/tmp/t", "tls-file")
            print(sbx.files.read("/tmp/t"))
            print(sbx.get_host(49983))
        finally:
            sbx.kill()
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("E2B_")}
    env.update(
        E2B_API_KEY=running_stack.api_key,
        E2B_DOMAIN=f"e2b.localhost:{running_stack.tls_port}",
        SSL_CERT_FILE=str(running_stack.ca_bundle),
    )
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split()
    assert lines[:2] == ["over-tls", "tls-file"]
    assert lines[2].startswith("49983-") and lines[2].endswith(f".e2b.localhost:{running_stack.tls_port}")


@pytest.fixture(scope="session")
def old_sdk_python() -> Path:
    python = OLD_SDK_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(OLD_SDK_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", OLD_SDK], check=True, timeout=600)
    return python


def test_older_sdk_using_v1_paths(running_stack, old_sdk_python: Path) -> None:  # type: ignore[no-untyped-def]
    script = textwrap.dedent(
        """
        from e2b import Sandbox
        sbx = Sandbox.create(timeout=60, metadata={"sdk": "old"})
        try:
            print(sbx.commands.run("echo old-sdk").stdout.strip())
            sbx.files.write("/tmp/o.txt", "old-file")
            print(sbx.files.read("/tmp/o.txt"))
            again = Sandbox.connect(sbx.sandbox_id)
            print(again.get_info().metadata["sdk"])
        finally:
            print(sbx.kill())
        """
    )
    env = dict(os.environ, **running_stack.sdk_env)
    out = subprocess.run([str(old_sdk_python), "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["old-sdk", "old-file", "old", "True"]


def test_health_reports_the_database_and_backend(running_stack) -> None:  # type: ignore[no-untyped-def]
    body = httpx.get(running_stack.sandbox_url + "/health").json()
    assert body["status"] in ("healthy", "degraded")
    assert body["dependencies"]["database"] == "ok"
