"""The walking skeleton, end to end: `pmoves-e2b up` starts the real stack and supervises it.

Each test drives the CLI as a user would, on free ports in a temp data dir.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import nats
import pytest
from stack.harness import clean_environ, free_ports

from pmoves_e2b.config import SERVICES

pytestmark = pytest.mark.stack

SERVICE_NAMES = {s.name for s in SERVICES}
# Extra stacks of these tests exercise the frame, not sandboxes: no warm pool (keeps them fast).
LEAN = {"E2B_POOL_SIZE": "0"}


def test_five_components_are_healthy_with_pmoves_health_json(running_stack) -> None:  # type: ignore[no-untyped-def]
    result = running_stack.cli("health")
    assert result.returncode == 0, result.stdout + result.stderr
    for service in SERVICES:
        for path in (service.health_path, "/healthz"):
            started = time.monotonic()
            response = httpx.get(running_stack.urls[service.key] + path, timeout=5)
            assert time.monotonic() - started < 1.0
            assert response.status_code == 200
            body = response.json()
            # Soft dependencies outside the stack (e.g. Agent Zero) may be absent: degraded, still 200.
            assert body["status"] in ("healthy", "degraded")
            assert body["service"] == service.name
            assert body["version"]
            assert body["uptime_seconds"] >= 0
            assert body["dependencies"]["nats"] == "connected"


def test_metrics_and_json_logs_name_the_service(running_stack) -> None:  # type: ignore[no-untyped-def]
    httpx.get(running_stack.desktop_url + "/healthz", timeout=5)
    metrics = httpx.get(running_stack.desktop_url + "/metrics", timeout=5).text
    assert 'http_requests_total{method="GET",path="/healthz",status="200"}' in metrics
    assert "http_request_duration_seconds_bucket" in metrics
    assert "process_resident_memory_bytes" in metrics
    for service in SERVICES:
        lines = [json.loads(line) for line in running_stack.log(service.key).splitlines() if line.startswith("{")]
        assert lines, f"no JSON log lines for {service.key}"
        assert {line["service"] for line in lines} == {service.name}
        assert all({"ts", "level", "msg"} <= line.keys() for line in lines)


def test_secrets_are_generated_private_and_never_logged(running_stack) -> None:  # type: ignore[no-untyped-def]
    secrets_dir = running_stack.data_dir / "secrets"
    key = running_stack.api_key
    assert key.startswith("e2b_") and len(key) == 44 and int(key[4:], 16) >= 0
    for name in ("E2B_API_KEY", "E2B_MCP_SERVER_TOKEN", "E2B_DESKTOP_AUTH_TOKEN", "E2B_NATS_PASSWORD"):
        assert (secrets_dir / name).stat().st_mode & 0o777 == 0o600
    logs = "".join(running_stack.log(c) for c in ("supervisor", "nats", "sandbox", "mcp", "surf", "desktop"))
    for secret in (running_stack.api_key, running_stack.mcp_token, running_stack.desktop_token):
        assert secret not in logs


def test_crashed_service_is_restarted_and_announces_itself_again(running_stack) -> None:  # type: ignore[no-untyped-def]
    async def scenario() -> dict:
        client = await nats.connect(running_stack.nats_url)
        subscription = await client.subscribe("services.announce.v1")
        try:
            old_pid = running_stack.service_pid("surf")
            os.kill(old_pid, signal.SIGKILL)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                message = await subscription.next_msg(timeout=deadline - time.monotonic())
                event = json.loads(message.data)
                if event["source"] == "e2b-surf":
                    assert event["payload"]["metadata"]["pid"] != old_pid
                    return event
            raise AssertionError("e2b-surf did not announce itself after the restart")
        finally:
            await client.close()

    event = asyncio.run(scenario())
    running_stack.wait_healthy("surf", timeout=60)
    assert running_stack.service_pid("surf") == event["payload"]["metadata"]["pid"]
    assert event["topic"] == "services.announce.v1" and event["version"] == "v1"
    payload = event["payload"]
    assert payload["slug"] == "e2b-surf" and payload["port"] == running_stack.ports["surf"]
    assert payload["health_check"] == running_stack.surf_url + "/healthz"
    assert "restarting" in running_stack.log("supervisor")


def _start_nats(tmp_path: Path, user: str, password: str) -> tuple[subprocess.Popen[bytes], int]:
    from pmoves_e2b.events.embedded import nats_server_binary

    port, monitor = free_ports(2)
    process = subprocess.Popen(
        [
            str(nats_server_binary()),
            "-a",
            "127.0.0.1",
            "-p",
            str(port),
            "-m",
            str(monitor),
            "-js",
            "-sd",
            str(tmp_path / "js"),
            "--user",
            user,
            "--pass",
            password,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{monitor}/healthz", timeout=0.5).status_code == 200:
                return process, port
        except httpx.HTTPError:
            time.sleep(0.05)
    process.kill()
    raise TimeoutError("test nats-server did not start")


def test_external_nats_with_credentials_gets_all_announcements(stack_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server, port = _start_nats(tmp_path, "pmoves", "s3cret-pass")
    url = f"nats://pmoves:s3cret-pass@127.0.0.1:{port}"
    stack = stack_factory({**LEAN, "NATS_URL": url}, start=False)

    async def collect() -> tuple[list[dict], object]:
        client = await nats.connect(url)
        try:
            subscription = await client.subscribe("services.announce.v1")
            await asyncio.to_thread(stack.up)
            events: dict[str, dict] = {}
            deadline = time.monotonic() + 30
            while len(events) < len(SERVICES) and time.monotonic() < deadline:
                message = await subscription.next_msg(timeout=deadline - time.monotonic())
                event = json.loads(message.data)
                events[event["source"]] = event
            return list(events.values()), await client.jetstream().stream_info("E2B")
        finally:
            await client.close()

    try:
        events, stream = asyncio.run(collect())
        assert {e["source"] for e in events} == SERVICE_NAMES
        for event in events:
            assert set(event) >= {"id", "topic", "ts", "version", "source", "payload"}
            assert set(event["payload"]) >= {
                "slug",
                "name",
                "url",
                "health_check",
                "tier",
                "port",
                "timestamp",
                "metadata",
            }
        # The stream that keeps e2b.> events exists on the external server, with its documented limits.
        config = stream.config  # type: ignore[attr-defined]
        assert config.subjects == ["e2b.>"] and config.max_age == 7 * 24 * 3600 and config.max_bytes == 1024**3
        # No embedded server was started; health checks the external one (credentials never shown).
        assert stack.service_pid("nats") is None
        result = stack.cli("health")
        assert result.returncode == 0, result.stdout
        assert "s3cret-pass" not in result.stdout + stack.cli("status").stdout
        assert "s3cret-pass" not in "".join(stack.log(c) for c in ("supervisor", "sandbox", "mcp", "surf", "desktop"))
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_nats_outage_degrades_health_but_services_stay_up(stack_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server, port = _start_nats(tmp_path, "u", "p")
    stack = stack_factory({**LEAN, "NATS_URL": f"nats://u:p@127.0.0.1:{port}"})
    server.terminate()
    server.wait(timeout=10)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        code, body = stack.health("desktop")
        if body["dependencies"]["nats"] == "disconnected":
            break
        time.sleep(0.2)
    assert (code, body["status"]) == (200, "degraded")
    result = stack.cli("health")
    assert result.returncode != 0
    assert "unreachable" in result.stdout


def test_down_stops_everything_and_leaves_no_process(stack_factory) -> None:  # type: ignore[no-untyped-def]
    stack = stack_factory(LEAN, start=False)
    result = stack.cli("up", timeout=150)
    assert result.returncode == 0, result.stdout + result.stderr
    # `up` tells where the secrets are and how to use the SDK, never the values.
    output = " ".join((result.stdout + result.stderr).split())
    assert str(stack.data_dir / "secrets" / "E2B_API_KEY") in output
    assert (
        f"export E2B_API_URL={stack.sandbox_url}" in output and f"export E2B_SANDBOX_URL={stack.sandbox_url}" in output
    )
    for secret in (stack.api_key, stack.mcp_token, stack.desktop_token):
        assert secret not in output
    pids = [stack.service_pid(c) for c in ("supervisor", "nats", "sandbox", "mcp", "surf", "desktop")]
    assert all(pids), pids
    assert set(pids) <= set(stack.processes())
    result = stack.down()
    assert result.returncode == 0, result.stderr
    assert stack.processes() == []  # includes every pid above
    assert list((stack.data_dir / "run").glob("*.pid")) == []
    status = stack.cli("status")
    assert "not running" in status.stdout
    assert stack.cli("health").returncode != 0
    # A second `up` in the same data dir works (secrets kept, not regenerated).
    key = stack.api_key
    stack.up()
    assert stack.api_key == key


def test_up_twice_is_harmless(running_stack) -> None:  # type: ignore[no-untyped-def]
    before = running_stack.service_pid("supervisor")
    result = running_stack.cli("up")
    assert result.returncode == 0
    assert "already running" in result.stdout
    assert running_stack.service_pid("supervisor") == before


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("E2B_MCP_PORT", "notaport", "E2B_MCP_PORT='notaport' is invalid"),
        ("E2B_MCP_PORT", "70000", "E2B_MCP_PORT='70000' is invalid"),
        ("E2B_API_KEY_FILE", "/nonexistent/e2b-api-key", "E2B_API_KEY_FILE=/nonexistent/e2b-api-key: cannot read it"),
        ("E2B_API_KEY_FILE", "/", "E2B_API_KEY_FILE=/: cannot read it"),
        ("LOG_LEVEL", "chatty", "LOG_LEVEL='CHATTY' is invalid"),
    ],
)
def test_config_errors_are_one_clear_line_and_nothing_starts(
    variable: str, value: str, expected: str, tmp_path: Path
) -> None:
    env = {**clean_environ(), "E2B_DATA_DIR": str(tmp_path), variable: value}
    for command in (["up"], ["health"], ["serve", "mcp"]):
        result = subprocess.run(
            [sys.executable, "-m", "pmoves_e2b.cli", *command], env=env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert expected in result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_busy_port_is_reported_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**clean_environ(), "E2B_DATA_DIR": str(tmp_path), "E2B_SANDBOX_PORT": str(port)}
        result = subprocess.run(
            [sys.executable, "-m", "pmoves_e2b.cli", "up"], env=env, capture_output=True, text=True, timeout=60
        )
    assert result.returncode == 1
    assert f"{port} (E2B_SANDBOX_PORT)" in result.stderr
    assert not (tmp_path / "run" / "supervisor.pid").exists()


def test_nats_server_crash_is_restarted_and_services_reconnect(running_stack) -> None:  # type: ignore[no-untyped-def]
    old_pid = running_stack.service_pid("nats")
    os.kill(old_pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pid = running_stack.service_pid("nats")
        if pid not in (None, old_pid) and all(
            running_stack.health(s.key)[1]["dependencies"]["nats"] == "connected" for s in SERVICES
        ):
            break
        time.sleep(0.3)
    else:
        raise AssertionError("services did not reconnect to the restarted nats-server")
    assert running_stack.cli("health").returncode == 0


def test_supervisor_killed_hard_takes_its_children_along_and_down_cleans_up(stack_factory) -> None:  # type: ignore[no-untyped-def]
    stack = stack_factory(LEAN)
    children = [stack.service_pid(c) for c in ("nats", "sandbox", "mcp", "surf", "desktop")]
    os.kill(stack.service_pid("supervisor"), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and set(children) & set(stack.processes()):
        time.sleep(0.1)
    assert not set(children) & set(stack.processes())
    result = stack.down()
    assert result.returncode == 0, result.stderr
    assert stack.processes() == [] and list((stack.data_dir / "run").glob("*.pid")) == []


def test_logs_command_prints_a_component_log_and_rejects_unknown_ones(running_stack) -> None:  # type: ignore[no-untyped-def]
    result = running_stack.cli("logs", "desktop", "-n", "3")
    assert result.returncode == 0
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["service"] == "e2b-desktop" for line in lines)
    unknown = running_stack.cli("logs", "nosuch")
    assert unknown.returncode == 1 and "unknown service 'nosuch'" in unknown.stderr


def test_foreground_supervisor_stops_everything_on_ctrl_c(stack_factory) -> None:  # type: ignore[no-untyped-def]
    stack = stack_factory(LEAN, start=False)
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "pmoves_e2b.cli", "up", "--foreground"],
        env=stack.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        stack.wait_healthy(timeout=120)
        assert stack.service_pid("supervisor") == supervisor.pid
        children = [stack.service_pid(c) for c in ("nats", "sandbox", "mcp", "surf", "desktop")]
        os.killpg(supervisor.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends
        assert supervisor.wait(timeout=60) == 0
        assert not set(children) & set(stack.processes())
        assert list((stack.data_dir / "run").glob("*.pid")) == []
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()


def test_up_that_cannot_get_healthy_says_why_and_down_still_cleans_up(stack_factory) -> None:  # type: ignore[no-untyped-def]
    closed_port = free_ports(1)[0]
    stack = stack_factory({**LEAN, "NATS_URL": f"nats://u:hidden-pass@127.0.0.1:{closed_port}"}, start=False)
    result = stack.cli("up", "--timeout", "8", timeout=120)
    assert result.returncode == 1
    assert "did not become healthy within 8 s" in result.stderr
    assert "unreachable" in result.stdout and "hidden-pass" not in result.stdout + result.stderr
    assert f"last lines of {stack.data_dir / 'logs' / 'supervisor.log'}" in " ".join(result.stderr.split())
    # The services themselves come up (NATS is soft for them), and `down` stops them (fixture checks).
    # Under load e2b-desktop may still be starting when `up` gives up after 8 s: wait for it to answer.
    deadline = time.monotonic() + 60
    while True:
        try:
            body = stack.health("desktop")[1]
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline, "e2b-desktop never answered its health check"
            time.sleep(0.2)
    assert body["dependencies"]["nats"] == "disconnected"
