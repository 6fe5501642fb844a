"""Sandbox-level env vars: fetched from envd (GET /envs with the caller's access token) on a
context's first execution. Runs the project's real envd on loopback."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from interpreter.conftest import InterpreterServer, free_port, start_server, stop_server

ACCESS_TOKEN = secrets.token_hex(16)
SANDBOX_ENVS = {"SANDBOX_LEVEL": "from envd", "OVERRIDDEN": "sandbox value"}


@pytest.fixture(scope="module")
def envd_url() -> Iterator[str]:
    port = free_port()
    init_secret = secrets.token_hex(16)
    env = dict(os.environ, ENVD_INIT_SECRET=init_secret)
    process = subprocess.Popen(
        [sys.executable, "-m", "pmoves_e2b.envd", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 204:
                    break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, "envd did not start"
            time.sleep(0.05)
        response = httpx.post(
            f"{url}/init",
            json={"envVars": SANDBOX_ENVS, "accessToken": ACCESS_TOKEN},
            headers={"X-Envd-Init-Secret": init_secret},
        )
        assert response.status_code == 204, response.text
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def server_with_envd(envd_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InterpreterServer]:
    running = start_server(tmp_path_factory.mktemp("interpreter-envd"), ["--envd-url", envd_url])
    try:
        yield running
    finally:
        stop_server(running)


def execute(server: InterpreterServer, body: dict[str, object], token: str | None = ACCESS_TOKEN) -> list[dict]:
    headers = {"X-Access-Token": token} if token else {}
    payload = {"context_id": None, "language": None, "env_vars": None, **body}
    with httpx.stream("POST", f"{server.url}/execute", json=payload, headers=headers, timeout=60) as response:
        assert response.status_code == 200, response.read()
        return [json.loads(line) for line in response.iter_lines() if line]


def main_text(lines: list[dict]) -> str | None:
    return next((line["text"] for line in lines if line["type"] == "result" and line["is_main_result"]), None)


def new_context(server: InterpreterServer, language: str = "python") -> str:
    return httpx.post(f"{server.url}/contexts", json={"language": language}, timeout=60).json()["id"]


def test_sandbox_envs_are_set_in_the_kernel(server_with_envd: InterpreterServer) -> None:
    context = new_context(server_with_envd)
    read = "import os; os.environ.get('SANDBOX_LEVEL', 'unset')"
    assert main_text(execute(server_with_envd, {"code": read, "context_id": context})) == "from envd"


def test_call_envs_override_then_fall_back_to_the_sandbox_value(server_with_envd: InterpreterServer) -> None:
    context = new_context(server_with_envd)
    read = "import os; os.environ.get('OVERRIDDEN', 'unset')"
    overridden = execute(server_with_envd, {"code": read, "context_id": context, "env_vars": {"OVERRIDDEN": "call"}})
    assert main_text(overridden) == "call"
    assert main_text(execute(server_with_envd, {"code": read, "context_id": context})) == "sandbox value"


def test_without_the_access_token_nothing_runs_and_a_later_call_applies_them(
    server_with_envd: InterpreterServer,
) -> None:
    context = new_context(server_with_envd)
    read = "import os; os.environ.get('SANDBOX_LEVEL', 'unset')"
    body = {"code": read, "context_id": context, "language": None, "env_vars": None}
    assert httpx.post(f"{server_with_envd.url}/execute", json=body, timeout=60).status_code == 401
    assert main_text(execute(server_with_envd, {"code": read, "context_id": context})) == "from envd"


def test_sandbox_envs_in_bash(server_with_envd: InterpreterServer) -> None:
    context = new_context(server_with_envd, "bash")
    lines = execute(server_with_envd, {"code": "echo $SANDBOX_LEVEL", "context_id": context})
    assert [line["text"] for line in lines if line["type"] == "stdout"] == ["from envd\n"]


def test_sandbox_envs_survive_a_restart(server_with_envd: InterpreterServer) -> None:
    context = new_context(server_with_envd)
    read = "import os; os.environ.get('SANDBOX_LEVEL', 'unset')"
    execute(server_with_envd, {"code": "1", "context_id": context})
    assert httpx.post(f"{server_with_envd.url}/contexts/{context}/restart", timeout=60).status_code == 200
    assert main_text(execute(server_with_envd, {"code": read, "context_id": context})) == "from envd"


def test_execute_needs_envd_access_token(server_with_envd: InterpreterServer) -> None:
    """Issue 11 finding 2: code ran without the token; envd's token now guards /execute."""
    body = {"code": "print('ran')", "context_id": None, "language": None, "env_vars": None}
    for headers in ({}, {"X-Access-Token": "wrong"}, {"X-Access-Token": ""}):
        response = httpx.post(f"{server_with_envd.url}/execute", json=body, headers=headers, timeout=60)
        assert response.status_code == 401, (headers, response.text)
        assert "ran" not in response.text
    assert any(line.get("text") == "ran\n" for line in execute(server_with_envd, {"code": "print('ran')"}))


def test_context_routes_refuse_a_wrong_token_and_health_stays_open(server_with_envd: InterpreterServer) -> None:
    wrong = {"X-Access-Token": "wrong"}
    assert httpx.get(f"{server_with_envd.url}/contexts", headers=wrong, timeout=30).status_code == 401
    assert httpx.post(f"{server_with_envd.url}/contexts", json={}, headers=wrong, timeout=30).status_code == 401
    right = {"X-Access-Token": ACCESS_TOKEN}
    assert httpx.get(f"{server_with_envd.url}/contexts", headers=right, timeout=30).status_code == 200
    assert httpx.get(f"{server_with_envd.url}/health", timeout=30).status_code == 200
