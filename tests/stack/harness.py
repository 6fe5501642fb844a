"""The stack test harness: start a real `pmoves-e2b up` stack on free ports and clean up after it.

Import it from any test (``tests/`` is on sys.path through the root conftest):
``from stack.harness import free_ports, RunningStack``. The fixtures that use it live in
``tests/conftest.py`` (``running_stack``, ``sdk_env``, ``stack_factory``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from pmoves_e2b.config import SERVICES, SERVICES_BY_KEY, default_data_dir

STACK_TEST_ENV: dict[str, str] = {
    # e2b-mcp-server's health probes Agent Zero; the default (agent-zero:8080) would send DNS
    # queries off the machine. A closed loopback port answers "unreachable" at once.
    "AGENT_ZERO_URL": "http://127.0.0.1:9",
    # The compatibility suite runs 20 sandboxes at once.
    "E2B_MAX_SANDBOXES": "24",
    # ...idle ones: promise them more memory than the machine has (the default budget is its memory).
    "E2B_MEMORY_BUDGET_MB": str(24 * 2048),
    # One warm sandbox per template keeps creates fast without crowding the 2-core CI machine.
    "E2B_POOL_SIZE": "1",
    # ...and no more: a pool that followed the suite's bursts would boot sandboxes under later tests.
    # tests/manager pins how the pool follows demand.
    "E2B_POOL_MAX": "1",
}

PORT_VARS = {
    "sandbox": "E2B_SANDBOX_PORT",
    "sandbox_tls": "E2B_SANDBOX_TLS_PORT",
    "mcp": "E2B_MCP_PORT",
    "surf": "E2B_SURF_PORT",
    "desktop": "E2B_DESKTOP_PORT",
    "nats": "E2B_NATS_PORT",
    "nats_monitor": "E2B_NATS_MONITOR_PORT",
}
# Variables of ours that must not leak from the developer's shell into a test stack.
OWN_VAR_PREFIXES = ("E2B_", "NATS_URL", "AGENT_ZERO_URL", "NEXT_PUBLIC_API_URL", "LOG_LEVEL", "LOG_FORMAT")
SHARED_TEMPLATES_DIR = Path(os.environ.get("E2B_TEMPLATES_DIR") or default_data_dir() / "templates")


def free_ports(count: int) -> list[int]:
    """Distinct ports nobody listens on right now (bound to port 0, then released)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def clean_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(OWN_VAR_PREFIXES)}


@contextlib.contextmanager
def serve_alone(service: str, env: dict[str, str], log_path: Path, health_path: str) -> Iterator[str]:
    """One service on its own (``pmoves-e2b serve <service>``) with ``env``; yields its base URL
    (from ``E2B_BIND`` and the service's port variable) once ``health_path`` answers."""
    port = env[PORT_VARS[service]]
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pmoves_e2b.cli", "serve", service],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    url = f"http://{env['E2B_BIND']}:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url + health_path, timeout=2, trust_env=False)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{service} did not start:\n" + log_path.read_text()) from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def mounts_of(data_dir: Path) -> list[str]:
    """Mount points tied to a data dir: under it, bind-mounted from it, or overlays writing into it."""
    prefix = str(data_dir.resolve())

    def inside(path: str) -> bool:
        return path == prefix or path.startswith(prefix + "/")

    points = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            root, point = fields[3], fields[4]
            if inside(point) or inside(root) or f"={prefix}/" in fields[-1]:
                points.append(point)
    return points


def unmount_all(points: list[str]) -> None:
    """Lazy-unmount, deepest first (only used to clean up after a leak was recorded)."""
    for point in sorted(points, key=lambda p: p.count("/"), reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)


def processes_of(data_dir: Path) -> list[int]:
    """Live processes tied to a data dir: by command line, working dir or ``E2B_DATA_DIR`` in their env."""
    text = str(data_dir)
    env_entry = f"E2B_DATA_DIR={text}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (entry / "environ").read_bytes().split(b"\0")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if state == "Z":
            continue
        if text in cmdline or env_entry in environ or cwd == text or cwd.startswith(text + "/"):
            found.append(int(entry.name))
    return found


@dataclass
class RunningStack:
    data_dir: Path
    settings_env: dict[str, str]
    ports: dict[str, int]
    env: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.env = {**clean_environ(), **self.settings_env}

    # --- addresses and secrets -----------------------------------------------------------
    @property
    def urls(self) -> dict[str, str]:
        return {s.key: f"http://127.0.0.1:{self.ports[s.key]}" for s in SERVICES}

    @property
    def sandbox_url(self) -> str:
        return self.urls["sandbox"]

    @property
    def mcp_url(self) -> str:
        return self.urls["mcp"]

    @property
    def surf_url(self) -> str:
        return self.urls["surf"]

    @property
    def desktop_url(self) -> str:
        return self.urls["desktop"]

    @property
    def nats_url(self) -> str:
        """The external ``NATS_URL``, else the embedded server as user ``pmoves`` (what PMOVES' publishers use)."""
        if "NATS_URL" in self.settings_env:
            return self.settings_env["NATS_URL"]
        return f"nats://pmoves:{self._secret('E2B_NATS_PASSWORD')}@127.0.0.1:{self.ports['nats']}"

    @property
    def tls_port(self) -> int:
        return self.ports["sandbox_tls"]

    @property
    def ca_bundle(self) -> Path:
        return self.data_dir / "tls" / "bundle.pem"

    def _secret(self, name: str) -> str:
        return self.settings_env.get(name) or (self.data_dir / "secrets" / name).read_text().strip()

    @property
    def api_key(self) -> str:
        return self._secret("E2B_API_KEY")

    @property
    def mcp_token(self) -> str:
        return self._secret("E2B_MCP_SERVER_TOKEN")

    @property
    def desktop_token(self) -> str:
        return self._secret("E2B_DESKTOP_AUTH_TOKEN")

    @property
    def surf_token(self) -> str:
        return self._secret("E2B_SURF_AUTH_TOKEN")

    @property
    def sdk_env(self) -> dict[str, str]:
        return {"E2B_API_KEY": self.api_key, "E2B_API_URL": self.sandbox_url, "E2B_SANDBOX_URL": self.sandbox_url}

    @property
    def max_sandboxes(self) -> int:
        return int(self.settings_env.get("E2B_MAX_SANDBOXES", "5"))

    # --- control -------------------------------------------------------------------------
    def cli(
        self, *args: str, timeout: float = 60, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pmoves_e2b.cli", *args],
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def up(self, timeout: float = 120) -> None:
        result = self.cli("up", "--timeout", str(timeout), timeout=timeout + 30)
        if result.returncode != 0:
            raise RuntimeError(
                f"pmoves-e2b up failed ({result.returncode}):\n{result.stdout}\n{result.stderr}\n" + self._log_tails()
            )

    def down(self, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.cli("down", "--timeout", str(timeout), timeout=timeout + 30)

    def service_pid(self, key: str) -> int | None:
        try:
            pid = int((self.data_dir / "run" / f"{key}.pid").read_text())
        except (OSError, ValueError):
            return None
        return pid if Path(f"/proc/{pid}").exists() else None

    def health(self, key: str) -> tuple[int, dict]:
        service = SERVICES_BY_KEY[key]
        response = httpx.get(self.urls[key] + service.health_path, timeout=5, trust_env=False)
        return response.status_code, response.json()

    def wait_healthy(self, key: str | None = None, timeout: float = 60) -> None:
        """Wait until ``key`` (or all five components) answer healthy; raises with logs otherwise."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            result = self.cli("health", timeout=30)
            if key is None and result.returncode == 0:
                return
            if key is not None:
                try:
                    code, body = self.health(key)
                    if code == 200 and body.get("service") == SERVICES_BY_KEY[key].name:
                        return
                    last = f"{code} {body}"
                except (httpx.HTTPError, ValueError) as exc:
                    last = repr(exc)
            else:
                last = result.stdout
            time.sleep(0.3)
        raise TimeoutError(f"{key or 'stack'} not healthy after {timeout:.0f} s: {last}\n{self._log_tails()}")

    def log(self, component: str) -> str:
        path = self.data_dir / "logs" / f"{component}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def processes(self) -> list[int]:
        return processes_of(self.data_dir)

    def _log_tails(self, lines: int = 15) -> str:
        parts = []
        for path in sorted((self.data_dir / "logs").glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)


def make_stack(extra_env: dict[str, str] | None = None) -> RunningStack:
    data_dir = Path(tempfile.mkdtemp(prefix="pmoves-e2b-test-"))
    ports = dict(zip(PORT_VARS, free_ports(len(PORT_VARS)), strict=True))
    settings_env = {
        "E2B_DATA_DIR": str(data_dir),
        "E2B_TEMPLATES_DIR": str(SHARED_TEMPLATES_DIR),
        "E2B_BIND": "127.0.0.1",
        **{var: str(ports[key]) for key, var in PORT_VARS.items()},
        **STACK_TEST_ENV,
        **(extra_env or {}),
    }
    return RunningStack(data_dir, settings_env, ports)


@contextlib.contextmanager
def started_stack(extra_env: dict[str, str] | None = None) -> Iterator[RunningStack]:
    """``make_stack(extra_env)``, up; afterwards stopped and checked that nothing is left."""
    stack = make_stack(extra_env)
    try:
        stack.up()
    except BaseException:
        stack.down()
        raise
    try:
        yield stack
    finally:  # a script's exception inside the block must not leave the stack running
        stop_and_clean(stack)


def stop_and_clean(stack: RunningStack) -> None:
    """`down`, then make sure nothing is left; raises AssertionError describing any leak."""
    result = stack.down()
    leftovers = stack.processes()
    for pid in leftovers:  # never leave them running, even when the test fails
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    mounts = mounts_of(stack.data_dir)
    unmount_all(mounts)  # leave the machine clean even when the stack leaked; the leak still fails below
    if not mounts_of(stack.data_dir):
        shutil.rmtree(stack.data_dir, ignore_errors=True)
    assert result.returncode == 0, f"pmoves-e2b down failed: {result.stdout}{result.stderr}"
    assert not leftovers, f"processes left after down: {leftovers}"
    assert not mounts, f"mounts left under {stack.data_dir}: {mounts}"


def link_shared_templates(shared: Path, where: Path) -> Path:
    """``where`` as a templates dir of its own: ``shared``'s layers linked in, its records copied, so
    builds and snapshots write only there."""
    (where / "layers").mkdir(parents=True)
    for layer in (shared / "layers").iterdir():
        if layer.is_dir() and not layer.name.startswith("."):
            (where / "layers" / layer.name).symlink_to(layer)
    for record in shared.glob("*.json"):
        (where / record.name).write_text(record.read_text())
    return where
