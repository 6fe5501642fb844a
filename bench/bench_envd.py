"""envd: cold start, command round trip and file throughput, each next to a baseline from the
same run.

Run: ``.venv/bin/python bench/bench_envd.py [--runs N]``. envd runs as a real subprocess on a free
loopback port (as root, default user root); the client is the stock ``e2b`` SDK, as users have it.

| number | baseline |
|---|---|
| envd cold start (spawn → first 204 from /health) | ``python -c pass`` (bare interpreter start) |
| envd import time (``import pmoves_e2b.envd.app``) | ``import json`` |
| ``commands.run("true")`` round trip (p50/p95) | fork+exec of ``/bin/true`` from Python |
| raw Connect ``Start`` of ``/bin/true`` on one kept-alive socket (envd cost without the SDK) | same |
| ``files.write`` + ``files.read`` of 1 KB and 100 MB | the same write + read on the local disk |
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
sys.path.insert(0, str(SRC))

MIB = 1 << 20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def envd_env(user: str = "root") -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(SRC), "ENVD_DEFAULT_USER": user}


@contextlib.contextmanager
def bench_user() -> Iterator[str]:
    """A fresh user with Debian's default dotfiles: root's login profile on a dev host can be
    slow (pyenv), which would measure the host's shell setup instead of envd."""
    if os.geteuid() != 0:
        yield pwd.getpwuid(os.geteuid()).pw_name
        return
    name = f"e2bbench{os.getpid()}"
    subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["pkill", "-KILL", "-u", name], check=False)
        subprocess.run(["userdel", "--remove", name], check=False, capture_output=True)


def start_envd(port: int, user: str = "root") -> tuple[subprocess.Popen[bytes], float]:
    """Start envd and return it with the seconds until /health answered 204."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "pmoves_e2b.envd", "--host", "127.0.0.1", "--port", str(port)],
        env=envd_env(user),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    deadline = started + 30
    while time.perf_counter() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(request)
                if sock.recv(64).startswith(b"HTTP/1.1 204"):
                    return process, time.perf_counter() - started
        except OSError:
            time.sleep(0.002)
    process.kill()
    raise TimeoutError("envd did not start")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def timed(fn: Callable[[], object], runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return samples


def interleaved(cases: dict[str, Callable[[], object]], runs: int, warmup: int = 0) -> dict[str, list[float]]:
    """Sample every case round-robin, so shared-machine load hits each one alike."""
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for round_index in range(warmup + runs):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            if round_index >= warmup:
                samples[name].append(time.perf_counter() - t0)
    return samples


def p(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.2f} ms"


def row(name: str, value: float, baseline: float, unit: Callable[[float], str] = ms) -> None:
    print(f"{name:<52} {unit(value)}   baseline {unit(baseline)}   ratio {value / baseline:6.2f}x")


class ConnectStartClient:
    """One kept-alive HTTP/1.1 socket sending Connect+JSON ``Start`` requests (chunk-free body)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        message = json.dumps({"process": {"cmd": "/bin/true"}, "stdin": False}).encode()
        body = b"\x00" + len(message).to_bytes(4, "big") + message
        self.request = (
            b"POST /process.Process/Start HTTP/1.1\r\nHost: x\r\nConnect-Protocol-Version: 1\r\n"
            b"Content-Type: application/connect+json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )

    def start_true(self) -> None:
        self.sock.sendall(self.request)
        data = b""
        # The stream ends with the end-stream frame (flag 0x02) and the chunked terminator.
        while not data.endswith(b"0\r\n\r\n"):
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("envd closed the connection")
            data += chunk
        if b'"exitCode"' in data or b'"end"' not in data:
            raise RuntimeError(data[-300:])


def bench_start(runs: int) -> None:
    starts = []
    for _ in range(runs):
        process, seconds = start_envd(free_port())
        starts.append(seconds)
        stop(process)
    bare = timed(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True), runs)
    row("envd cold start to first /health (median)", statistics.median(starts), statistics.median(bare))
    code = "import time,sys;t=time.perf_counter();import {m};sys.stdout.write(str(time.perf_counter()-t))"
    env = envd_env()

    def import_time(module: str) -> float:
        out = subprocess.run([sys.executable, "-c", code.format(m=module)], env=env, capture_output=True, check=True)
        return float(out.stdout)

    envd_imports = (
        "pmoves_e2b.envd.__main__ as m;m._skip_connectrpc_version_lookup();import uvicorn,pmoves_e2b.envd.app"
    )
    row(
        "import uvicorn + envd app, as __main__ does (median)",
        statistics.median(import_time(envd_imports) for _ in range(runs)),
        statistics.median(import_time("json") for _ in range(runs)),
    )


def bench_commands(port: int, user: str, runs: int) -> None:
    from e2b import Sandbox
    from e2b.connection_config import ConnectionConfig
    from packaging.version import Version

    from pmoves_e2b.envd import ENVD_VERSION

    config = ConnectionConfig(sandbox_url=f"http://127.0.0.1:{port}", api_key="bench")
    sandbox = Sandbox(
        sandbox_id="bench",
        sandbox_domain=None,
        envd_version=Version(ENVD_VERSION),
        envd_access_token=None,
        connection_config=config,
    )
    raw_client = ConnectStartClient(port)
    entry = pwd.getpwnam(user)
    as_user = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--init-groups", "--"]
    login_env = {"PATH": os.environ.get("PATH", ""), "HOME": entry.pw_dir, "USER": user}
    cases: dict[str, Callable[[], object]] = {
        "sdk": lambda: sandbox.commands.run("true"),
        "raw": raw_client.start_true,
        "fork": lambda: subprocess.run(["/bin/true"], check=True),
        "bash": lambda: subprocess.run(
            [*as_user, "/bin/bash", "-l", "-c", "true"], check=True, cwd=entry.pw_dir, env=login_env
        ),
    }
    samples = interleaved(cases, runs, warmup=10)
    sdk, raw, fork, bash = (samples[name] for name in ("sdk", "raw", "fork", "bash"))
    row('commands.run("true") p50 (SDK, bash -l -c)', p(sdk, 0.5), p(fork, 0.5))
    row('commands.run("true") p95 (SDK, bash -l -c)', p(sdk, 0.95), p(fork, 0.95))
    row('commands.run("true") p50 vs local `bash -l -c true` as user', p(sdk, 0.5), p(bash, 0.5))
    row("raw Connect Start /bin/true p50 (one socket)", p(raw, 0.5), p(fork, 0.5))
    row("raw Connect Start /bin/true p95 (one socket)", p(raw, 0.95), p(fork, 0.95))
    return sandbox  # type: ignore[return-value]


class RawFilesClient:
    """POST (octet-stream) and GET /files on one kept-alive socket: envd's own throughput,
    without a Python HTTP client library's parsing cost in the number."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _response(self) -> bytes:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("envd closed the connection")
            head += chunk
        header, _, body = head.partition(b"\r\n\r\n")
        if not header.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(header)
        length = next(
            int(line.split(b":")[1]) for line in header.split(b"\r\n") if line.lower().startswith(b"content-length:")
        )
        parts = [body]
        received = len(body)
        while received < length:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("envd closed the connection")
            parts.append(chunk)
            received += len(chunk)
        return b"".join(parts)

    def round_trip(self, path: str, payload: bytes) -> None:
        self.sock.sendall(
            f"POST /files?path={path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n".encode()
        )
        self.sock.sendall(payload)
        self._response()
        self.sock.sendall(f"GET /files?path={path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        if self._response() != payload:
            raise RuntimeError("raw round trip changed the data")


def mibs(value: float) -> str:
    return f"{value:8.1f} MiB/s"


def file_round_trips(
    sandbox: object, raw: RawFilesClient, workdir: str, size: int, count: int
) -> tuple[float, float, float]:
    """Median seconds of write+read via the SDK, via raw HTTP, and on the local disk."""
    payload = os.urandom(size)
    path = f"{workdir}/bench-{size}"
    local = Path(f"{workdir}/local-{size}")

    def via_sdk() -> None:
        sandbox.files.write(path, payload)  # type: ignore[attr-defined]
        if bytes(sandbox.files.read(path, format="bytes")) != payload:  # type: ignore[attr-defined]
            raise RuntimeError("round trip changed the data")

    def via_disk() -> None:
        local.write_bytes(payload)
        if local.read_bytes() != payload:
            raise RuntimeError("disk round trip changed the data")

    return (
        statistics.median(timed(via_sdk, count)),
        statistics.median(timed(lambda: raw.round_trip(path, payload), count)),
        statistics.median(timed(via_disk, count)),
    )


def bench_files(sandbox: object, port: int, workdir: str, runs: int) -> None:
    raw = RawFilesClient(port)
    sdk_t, raw_t, disk_t = file_round_trips(sandbox, raw, workdir, 1024, runs)
    row("files.write+read 1 KB (SDK, median latency)", sdk_t, disk_t)
    row("POST+GET /files 1 KB (raw HTTP, median latency)", raw_t, disk_t)
    size = 100 * MIB
    sdk_t, raw_t, disk_t = file_round_trips(sandbox, raw, workdir, size, 3)
    disk_rate = 2 * size / disk_t / MIB
    row("files.write+read 100 MB (SDK, throughput)", 2 * size / sdk_t / MIB, disk_rate, mibs)
    row("POST+GET /files 100 MB (raw HTTP, throughput)", 2 * size / raw_t / MIB, disk_rate, mibs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help="samples for latency numbers")
    options = parser.parse_args()
    print("envd bench (numbers next to same-run baselines)")
    bench_start(max(3, min(options.runs, 10)))
    port = free_port()
    with bench_user() as user:
        process, _ = start_envd(port, user)
        try:
            sandbox = bench_commands(port, user, options.runs)
            with tempfile.TemporaryDirectory(prefix="envd-bench-") as workdir:
                bench_files(sandbox, port, workdir, min(options.runs, 100))
        finally:
            stop(process)


if __name__ == "__main__":
    main()
