"""Helpers for the e2b-mcp-server tests: a standalone service process and the mcp 1.22 client venv."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from stack.harness import clean_environ, free_ports, serve_alone

# Agent Zero pins mcp==1.22.0; the tests drive our server with that exact client too.
MCP122_VERSION = "1.22.0"
MCP122_VENV = Path(os.environ.get("PMOVES_E2B_MCP122_VENV", "/var/cache/pmoves-e2b/mcp-1.22.0-venv"))
PROBE = Path(__file__).with_name("mcp122_probe.py")


# The sandbox tools every transport of e2b-mcp-server lists.
TOOLS = {
    "sandbox_create",
    "sandbox_list",
    "sandbox_kill",
    "sandbox_set_timeout",
    "run_code",
    "run_command",
    "read_file",
    "write_file",
    "list_files",
    "upload_url",
    "download_url",
}


@dataclass
class McpService:
    url: str
    token: str
    api_key: str
    env: dict[str, str]

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def stdio_command(self) -> list[str]:
        return [sys.executable, "-m", "pmoves_e2b.cli", "mcp", "--stdio"]


def service_env(data_dir: Path, port: int, **extra: str) -> dict[str, str]:
    env = clean_environ()
    closed_port, nats_port = free_ports(2)
    closed = f"http://127.0.0.1:{closed_port}"  # nothing listens: "backend down"
    env.update(
        E2B_DATA_DIR=str(data_dir),
        E2B_BIND="127.0.0.1",
        E2B_MCP_PORT=str(port),
        E2B_API_KEY="e2b_test_key_" + "a" * 24,
        E2B_MCP_SERVER_TOKEN="test-token-" + "b" * 32,
        E2B_SANDBOX_URL=closed,
        AGENT_ZERO_URL=closed,
        NATS_URL=f"nats://127.0.0.1:{nats_port}",
        LOG_FORMAT="text",
    )
    env.update(extra)
    return env


@contextlib.contextmanager
def run_service(data_dir: Path, **extra: str) -> Iterator[McpService]:
    """e2b-mcp-server alone (``pmoves-e2b serve mcp``), its sandbox backend unreachable."""
    env = service_env(data_dir, free_ports(1)[0], **extra)
    with serve_alone("mcp", env, data_dir / "mcp.log", "/healthz") as url:
        yield McpService(url, env["E2B_MCP_SERVER_TOKEN"], env["E2B_API_KEY"], env)


def mcp122_python() -> Path:
    """The python of a venv with mcp==1.22.0, built once per machine (cached, file-locked)."""
    python = MCP122_VENV / "bin" / "python"
    ready = MCP122_VENV / ".ready"
    MCP122_VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(MCP122_VENV.parent / ".mcp122.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not ready.exists():
            shutil.rmtree(MCP122_VENV, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(MCP122_VENV)], check=True, timeout=300)
            subprocess.run(
                [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", f"mcp=={MCP122_VERSION}"],
                check=True,
                timeout=600,
            )
            ready.touch()
    return python


def run_probe(python: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> dict:
    """Run mcp122_probe.py with the 1.22 client; returns its JSON answer."""
    result = subprocess.run(
        [str(python), str(PROBE), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    if result.returncode != 0:
        raise AssertionError(f"probe {args[:2]} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])
