"""A real interpreter server on the host, driven by the stock e2b_code_interpreter SDK.

The server runs as a subprocess on a free port with the Python and Bash kernelspecs written into a
temporary Jupyter path. The SDK runs in debug mode (no control plane) with ``sandbox_url`` pointed
at that port, which is how it reaches port 49999 of a sandbox.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from e2b_code_interpreter import Sandbox

from pmoves_e2b.interpreter.kernelspecs_install import install

START_TIMEOUT_SECONDS = 90.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stat_fields(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, start time) of every process below `pid`; kernels lead their own sessions."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append((int(entry.name), fields[19]))
    found: list[tuple[int, str]] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


def kill_if_same(pid: int, start_time: str) -> None:
    """Kill a leftover process, unless its pid now belongs to another process."""
    fields = _stat_fields(pid)
    if fields is not None and fields[19] == start_time:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


@dataclass
class InterpreterServer:
    url: str
    process: subprocess.Popen[bytes]
    home: Path
    jupyter_path: Path
    log_path: Path

    def sandbox(self) -> Sandbox:
        return Sandbox.create(debug=True, sandbox_url=self.url, api_key="test-key")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(root: Path, extra_args: list[str] | None = None) -> InterpreterServer:
    prefix = root / "prefix"
    install(prefix)
    home = root / "home"
    home.mkdir(exist_ok=True)
    port = free_port()
    env = dict(os.environ)
    # Kernelspecs already on JUPYTER_PATH (e.g. a Deno or R kernel) come after ours.
    env["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(prefix / "share" / "jupyter"), env.get("JUPYTER_PATH")]))
    env["IPYTHONDIR"] = str(root / "ipython")  # no startup files from the machine's profile
    env.pop("MPLBACKEND", None)
    log_path = root / "server.log"
    args = [
        sys.executable,
        "-m",
        "pmoves_e2b.interpreter",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--cwd",
        str(home),
        "--envd-url",
        "",
        "--keepalive-seconds",
        "0.5",
        "--log-level",
        "info",
        *(extra_args or []),
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = InterpreterServer(f"http://127.0.0.1:{port}", process, home, prefix / "share" / "jupyter", log_path)
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"interpreter server exited: {server.log()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    stop_server(server)
    raise RuntimeError(f"interpreter server not healthy in {START_TIMEOUT_SECONDS} s: {server.log()}")


def stop_server(server: InterpreterServer) -> None:
    tree = descendants(server.process.pid)
    server.process.send_signal(signal.SIGTERM)
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=10)
    for pid, start_time in tree:
        kill_if_same(pid, start_time)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InterpreterServer]:
    running = start_server(tmp_path_factory.mktemp("interpreter"))
    try:
        yield running
    finally:
        stop_server(running)


@pytest.fixture()
def sandbox(server: InterpreterServer) -> Sandbox:
    return server.sandbox()
