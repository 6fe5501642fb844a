"""envd fixtures: a real envd subprocess on a free port, a throwaway unprivileged user, and
stock-SDK sandbox objects pointed at it (``sandbox_url`` = the envd, version = ENVD_VERSION).

``envd`` (module scope) -> ``RunningEnvd`` (``url``, ``port``, ``init_secret``, ``user``).
``fresh_envd`` (function scope) for tests that change envd state (access token, /init).
``sandbox`` / ``async_sandbox``: ``e2b.Sandbox`` / ``e2b.AsyncSandbox`` bound to ``envd``.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from e2b import AsyncSandbox, Sandbox
from e2b.connection_config import ConnectionConfig
from packaging.version import Version

from pmoves_e2b.envd import ENVD_VERSION

REPO_SRC = Path(__file__).resolve().parents[2] / "src"
START_TIMEOUT = 15.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningEnvd:
    process: subprocess.Popen[bytes]
    port: int
    init_secret: str
    user: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def init(self, body: dict[str, object]) -> httpx.Response:
        return httpx.post(f"{self.url}/init", json=body, headers={"X-Envd-Init-Secret": self.init_secret})


def wait_healthy(url: str, process: subprocess.Popen[bytes], timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"envd exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 204:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError("envd did not become healthy")


def start_envd(user: str, port: int | None = None, extra_env: dict[str, str] | None = None) -> RunningEnvd:
    port = port or free_port()
    secret = secrets.token_urlsafe(16)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(REPO_SRC),
        "ENVD_DEFAULT_USER": user,
        "ENVD_INIT_SECRET": secret,
        **(extra_env or {}),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "pmoves_e2b.envd", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    running = RunningEnvd(process, port, secret, user, env)
    try:
        wait_healthy(running.url, process)
    except BaseException:
        stop_envd(running)
        raise
    return running


def stop_envd(running: RunningEnvd) -> str:
    """Stop envd (it kills its own processes on shutdown) and return its stderr."""
    if running.process.poll() is None:
        running.process.send_signal(signal.SIGTERM)
        try:
            running.process.wait(10)
        except subprocess.TimeoutExpired:
            running.process.kill()
            running.process.wait(5)
    return running.process.stderr.read().decode(errors="replace") if running.process.stderr else ""


@pytest.fixture(scope="session")
def envd_user() -> Iterator[str]:
    """A throwaway unprivileged user with a home dir (removed with its files at the end)."""
    if os.geteuid() != 0 or not shutil.which("useradd"):
        yield pwd.getpwuid(os.geteuid()).pw_name
        return
    name = f"e2benvd{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["pkill", "-KILL", "-u", name], check=False)
        subprocess.run(["userdel", "--remove", name], check=False, capture_output=True)


@pytest.fixture(scope="module")
def envd(envd_user: str) -> Iterator[RunningEnvd]:
    running = start_envd(envd_user)
    yield running
    stderr = stop_envd(running)
    assert "Traceback" not in stderr, stderr


@pytest.fixture
def fresh_envd(envd_user: str) -> Iterator[RunningEnvd]:
    running = start_envd(envd_user)
    yield running
    stderr = stop_envd(running)
    assert "Traceback" not in stderr, stderr


def sdk_config(envd: RunningEnvd, token: str | None = None) -> ConnectionConfig:
    headers = {"E2b-Sandbox-Id": "envdtest", "E2b-Sandbox-Port": "49983"}
    if token:
        headers["X-Access-Token"] = token
    return ConnectionConfig(sandbox_url=envd.url, api_key="e2b_test", extra_sandbox_headers=headers)


def make_sandbox(envd: RunningEnvd, token: str | None = None, version: str = ENVD_VERSION) -> Sandbox:
    return Sandbox(
        sandbox_id="envdtest",
        sandbox_domain=None,
        envd_version=Version(version),
        envd_access_token=token,
        connection_config=sdk_config(envd, token),
    )


def make_async_sandbox(envd: RunningEnvd, token: str | None = None) -> AsyncSandbox:
    return AsyncSandbox(
        sandbox_id="envdtest",
        sandbox_domain=None,
        envd_version=Version(ENVD_VERSION),
        envd_access_token=token,
        connection_config=sdk_config(envd, token),
    )


@pytest.fixture
def sandbox(envd: RunningEnvd) -> Sandbox:
    return make_sandbox(envd)


@pytest.fixture
def async_sandbox(envd: RunningEnvd) -> AsyncSandbox:
    return make_async_sandbox(envd)


@pytest.fixture
def home(envd: RunningEnvd) -> str:
    return pwd.getpwnam(envd.user).pw_dir
