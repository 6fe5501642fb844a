"""The supervisor behind ``pmoves-e2b up``: runs nats-server and the four services.

It starts the embedded nats-server (unless ``NATS_URL`` names an existing one), then each
service as ``python -m pmoves_e2b.cli serve <service>``, logging to ``<data>/logs`` and
writing pid files to ``<data>/run``. A component that dies is restarted with exponential
backoff. On SIGTERM/SIGINT it stops the services (SIGTERM, SIGKILL after a grace period;
e2b-sandbox gets its SIGTERM like the others and may clean up), then nats-server, and exits.

Run it with ``python -m pmoves_e2b.supervisor`` (what ``up`` does, detached) or ``up --foreground``.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from pmoves_e2b.config import SERVICES, ConfigError, Settings, get_settings
from pmoves_e2b.events import embedded
from pmoves_e2b.events.connection import probe as probe_nats
from pmoves_e2b.events.connection import redact_url
from pmoves_e2b.observability.logging import configure_logging
from pmoves_e2b.private_files import open_private_append, private_dir

log = logging.getLogger("pmoves_e2b.supervisor")

NATS = "nats"
SUPERVISOR = "supervisor"
COMPONENTS: tuple[str, ...] = (NATS, *(s.key for s in SERVICES))
STOP_GRACE_SECONDS = 10.0
BACKOFF_START_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 30.0
STABLE_AFTER_SECONDS = 30.0  # a component up this long has its backoff reset
PR_SET_PDEATHSIG = 1


# --- pid files -------------------------------------------------------------------------


def pid_file(settings: Settings, component: str) -> Path:
    return settings.run_dir / f"{component}.pid"


def log_file(settings: Settings, component: str) -> Path:
    return settings.logs_dir / f"{component}.log"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


def read_pid(settings: Settings, component: str) -> int | None:
    """The live pid recorded for ``component``, or None (stale files and reused pids ignored)."""
    try:
        pid = int(pid_file(settings, component).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    cmd = _cmdline(pid)
    marker = "nats-server" if component == NATS else "pmoves_e2b"
    if marker not in cmd or _is_zombie(pid):
        return None
    # Several stacks (tests) share a host: the pid must belong to *this* data dir's stack.
    if component == NATS and str(settings.nats_store_dir) not in cmd:
        return None
    return pid


def _write_pid(settings: Settings, component: str, pid: int) -> None:
    path = pid_file(settings, component)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{pid}\n")
    tmp.replace(path)


def _remove_pid(settings: Settings, component: str) -> None:
    pid_file(settings, component).unlink(missing_ok=True)


# --- health ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ComponentHealth:
    component: str
    name: str
    healthy: bool
    status: str  # healthy | degraded | unhealthy | unreachable
    url: str
    detail: str = ""


async def _service_health(client: httpx.AsyncClient, settings: Settings, key: str) -> ComponentHealth:
    service = next(s for s in SERVICES if s.key == key)
    url = settings.service_url(service) + service.health_path
    try:
        response = await client.get(url)
        body = response.json()
        status = str(body.get("status", "unknown"))
        deps = ", ".join(f"{k}={v}" for k, v in (body.get("dependencies") or {}).items())
        return ComponentHealth(key, service.name, response.status_code == 200, status, url, deps)
    except (httpx.HTTPError, ValueError) as exc:
        return ComponentHealth(key, service.name, False, "unreachable", url, type(exc).__name__)


async def _nats_health(client: httpx.AsyncClient, settings: Settings) -> ComponentHealth:
    if settings.embedded_nats:
        url = embedded.monitor_health_url(settings)
        try:
            response = await client.get(url)
            ok = response.status_code == 200
            return ComponentHealth(
                NATS, "nats-server", ok, "healthy" if ok else "unhealthy", url, "" if ok else response.text[:120]
            )
        except httpx.HTTPError as exc:
            return ComponentHealth(NATS, "nats-server", False, "unreachable", url, type(exc).__name__)
    url = redact_url(settings.nats_server_url)
    error = await probe_nats(settings.nats_server_url, timeout=1.5)
    return ComponentHealth(
        NATS, "nats (external)", error is None, "healthy" if error is None else "unreachable", url, error or ""
    )


async def check_health_async(settings: Settings, timeout: float = 2.0) -> list[ComponentHealth]:
    async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
        return list(
            await asyncio.gather(
                _nats_health(client, settings), *(_service_health(client, settings, s.key) for s in SERVICES)
            )
        )


def check_health(settings: Settings, timeout: float = 2.0) -> list[ComponentHealth]:
    """Health of NATS and the four services, checked concurrently."""
    return asyncio.run(check_health_async(settings, timeout))


# --- the supervisor --------------------------------------------------------------------


def _die_with_parent() -> None:
    # If the supervisor is killed hard, its children get SIGTERM instead of living on unsupervised.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    component: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff: float = BACKOFF_START_SECONDS
    next_start: float = 0.0


@dataclass
class Supervisor:
    settings: Settings
    children: dict[str, Child] = field(default_factory=dict)
    stopping: bool = False

    def __post_init__(self) -> None:
        if self.settings.embedded_nats:
            self.children[NATS] = Child(NATS, embedded.server_args(self.settings))
        for service in SERVICES:
            argv = [sys.executable, "-m", "pmoves_e2b.cli", "serve", service.key]
            self.children[service.key] = Child(service.key, argv)

    def run(self) -> int:
        for directory in (
            self.settings.e2b_data_dir,
            self.settings.run_dir,
            self.settings.logs_dir,
            self.settings.nats_store_dir,
        ):
            private_dir(directory)
        _write_pid(self.settings, SUPERVISOR, os.getpid())
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        log.info("supervisor starting", extra={"data_dir": str(self.settings.e2b_data_dir)})
        try:
            if NATS in self.children:
                self._start(self.children[NATS])
                self._wait_nats_ready(timeout=10.0)
            for service in SERVICES:
                if not self.stopping:
                    self._start(self.children[service.key])
            while not self.stopping:
                self._reap_and_restart()
                time.sleep(0.2)
        finally:
            self._stop_all()
            _remove_pid(self.settings, SUPERVISOR)
            log.info("supervisor stopped")
        return 0

    def _request_stop(self, signum: int, _frame: object) -> None:
        log.info("stop requested", extra={"signal": signal.Signals(signum).name})
        self.stopping = True

    def _start(self, child: Child) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open_private_append(log_file(self.settings, child.component)) as log_handle:
            child.process = subprocess.Popen(
                child.argv,
                stdin=subprocess.DEVNULL,
                stdout=log_handle,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(self.settings.e2b_data_dir),
                process_group=0,
                preexec_fn=_die_with_parent,
            )
        child.started_at = time.monotonic()
        _write_pid(self.settings, child.component, child.process.pid)
        log.info("started %s", child.component, extra={"component": child.component, "pid": child.process.pid})

    def _wait_nats_ready(self, timeout: float) -> None:
        url = embedded.monitor_health_url(self.settings)
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=0.5, trust_env=False) as client:
            while time.monotonic() < deadline and not self.stopping:
                try:
                    if client.get(url).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
        log.error("nats-server not ready after %.0f s; starting the services anyway (see logs/nats.log)", timeout)

    def _reap_and_restart(self) -> None:
        now = time.monotonic()
        for child in self.children.values():
            process = child.process
            if process is not None and process.poll() is not None:
                if now - child.started_at >= STABLE_AFTER_SECONDS:
                    child.backoff = BACKOFF_START_SECONDS
                child.next_start = now + child.backoff
                log.warning(
                    "%s exited with %s; restarting in %.1f s",
                    child.component,
                    process.returncode,
                    child.backoff,
                    extra={"component": child.component, "exit_code": process.returncode},
                )
                child.backoff = min(child.backoff * 2, BACKOFF_MAX_SECONDS)
                child.process = None
                _remove_pid(self.settings, child.component)
            if child.process is None and now >= child.next_start and not self.stopping:
                child.restarts += 1
                self._start(child)

    def _stop_all(self) -> None:
        # Services first (they may publish on shutdown), nats-server last.
        services = [c for c in self.children.values() if c.component != NATS]
        _terminate([c.process for c in services if c.process], STOP_GRACE_SECONDS)
        nats = self.children[NATS].process if NATS in self.children else None
        if nats is not None:
            _terminate([nats], STOP_GRACE_SECONDS)
        for child in self.children.values():
            child.process = None
            _remove_pid(self.settings, child.component)


def _terminate(processes: list[subprocess.Popen[bytes]], grace: float) -> None:
    """SIGTERM each process group, wait up to ``grace`` seconds, then SIGKILL what is left."""
    for process in processes:
        _signal_group(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("pid %d ignored SIGTERM for %.0f s; killing it", process.pid, grace)
            _signal_group(process.pid, signal.SIGKILL)
            process.wait()


def _signal_group(pid: int, signum: signal.Signals) -> None:
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        pass
    except PermissionError:
        os.kill(pid, signum)


# --- control from the CLI --------------------------------------------------------------


def supervisor_pid(settings: Settings) -> int | None:
    return read_pid(settings, SUPERVISOR)


def wait_until_gone(pids: list[int], timeout: float, poll: Callable[[], None] | None = None) -> list[int]:
    """Wait until none of ``pids`` is alive (zombies count as gone); returns the survivors."""
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if not _is_zombie(pid)]
        if alive:
            if poll:
                poll()
            time.sleep(0.1)
    return alive


def stop_stack(settings: Settings, timeout: float = STOP_GRACE_SECONDS + 10) -> list[int]:
    """Stop the supervisor, and any component left without one. Returns pids that survived."""
    pids = {c: read_pid(settings, c) for c in (SUPERVISOR, *COMPONENTS)}
    supervisor = pids.pop(SUPERVISOR)
    if supervisor is not None:
        os.kill(supervisor, signal.SIGTERM)
        if wait_until_gone([supervisor], timeout):
            log.warning("supervisor %d did not stop within %.0f s; killing it", supervisor, timeout)
            os.kill(supervisor, signal.SIGKILL)
            wait_until_gone([supervisor], 5)
    # Orphans (supervisor killed hard, or it failed to stop them): stop them directly.
    leftovers = [pid for c, pid in pids.items() if pid is not None and read_pid(settings, c) == pid]
    for pid in leftovers:
        _signal_group(pid, signal.SIGTERM)
    survivors = wait_until_gone(leftovers, STOP_GRACE_SECONDS)
    for pid in survivors:
        _signal_group(pid, signal.SIGKILL)
    survivors = wait_until_gone(survivors, 5) + ([supervisor] if supervisor and not _is_zombie(supervisor) else [])
    if not survivors:
        for component in (SUPERVISOR, *COMPONENTS):
            _remove_pid(settings, component)
    return survivors


def main() -> int:
    try:
        settings = get_settings()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(SUPERVISOR, settings.log_level, settings.log_format)
    try:
        supervisor = Supervisor(settings)
    except embedded.NatsCredentialsMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
