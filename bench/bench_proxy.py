"""Data-plane proxy: latency and throughput through the proxy vs. straight to the sandbox's server.

Run as root: ``.venv/bin/python bench/bench_proxy.py [--requests N]``. A network namespace plays
the sandbox (``tests/proxy/proxy_upstream_server.py`` on its veth address); the proxy runs in its
own process under uvicorn, as in e2b-sandbox. Each number is printed next to its baseline from
the same run: the same request sent directly to the sandbox address.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from proxy.proxy_harness import KNOWN_ID, SandboxNetns, can_make_netns  # noqa: E402

MIB = 1024 * 1024


class KeepAliveClient:
    """Minimal HTTP/1.1 client on one kept-alive socket, so client cost barely shows in the numbers."""

    def __init__(self, address: str, port: int, host: str) -> None:
        self.sock = socket.create_connection((address, port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.host = host

    def get_no_body(self, path: str) -> None:
        """GET a 204 response and return once it is complete."""
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("server closed the connection")
            data += chunk
        if not data.startswith(b"HTTP/1.1 204"):
            raise RuntimeError(data[:200])

    def download(self, size: int) -> int:
        self.sock.sendall(f"GET /download?size={size} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            data += self.sock.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        received = len(body)
        while received < size:
            chunk = self.sock.recv(1024 * 1024)
            if not chunk:
                raise ConnectionError("download cut short")
            received += len(chunk)
        return received

    def upload(self, size: int) -> None:
        piece = b"x" * MIB
        head = f"POST /sink HTTP/1.1\r\nHost: {self.host}\r\nTransfer-Encoding: chunked\r\n\r\n"
        self.sock.sendall(head.encode())
        for _ in range(size // MIB):
            self.sock.sendall(b"100000\r\n" + piece + b"\r\n")
        self.sock.sendall(b"0\r\n\r\n")
        data = b""
        while b'"sha256"' not in data:
            data += self.sock.recv(65536)

    def close(self) -> None:
        self.sock.close()


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency(clients: dict[str, KeepAliveClient], requests: int) -> dict[str, list[float]]:
    """Round trips of GET /health, interleaved between the paths so load drift hits all alike."""
    samples: dict[str, list[float]] = {name: [] for name in clients}
    for client in clients.values():  # warm up pools and caches
        for _ in range(200):
            client.get_no_body("/health")
    for _ in range(requests // 50):
        for name, client in clients.items():
            for _ in range(50):
                start = time.perf_counter()
                client.get_no_body("/health")
                samples[name].append((time.perf_counter() - start) * 1000)
    return samples


def parallel_rate(make: Callable[[], KeepAliveClient], clients: int, requests: int) -> float:
    """Requests per second of ``clients`` keep-alive connections sending GET /health at once."""
    connections = [make() for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)

    def run(client: KeepAliveClient) -> None:
        barrier.wait()
        for _ in range(requests):
            client.get_no_body("/health")

    threads = [threading.Thread(target=run, args=(c,)) for c in connections]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    for client in connections:
        client.close()
    return clients * requests / elapsed


def throughput(make: Callable[[], KeepAliveClient], action: str, size: int, rounds: int = 3) -> float:
    best = 0.0
    for _ in range(rounds):
        client = make()
        start = time.perf_counter()
        client.download(size) if action == "download" else client.upload(size)
        best = max(best, size / MIB / (time.perf_counter() - start))
        client.close()
    return best


def serve_proxy(sandbox_address: str) -> tuple[subprocess.Popen[str], int]:
    """The proxy in its own process, on a free loopback port (printed by the child)."""
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve-proxy", sandbox_address],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert child.stdout is not None
    line = child.stdout.readline().strip()
    if not line.startswith("port "):
        child.kill()
        raise RuntimeError("proxy process did not start")
    return child, int(line.split()[1])


def run_proxy_server(sandbox_address: str) -> None:
    import uvicorn
    from proxy_harness import make_proxy

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)  # connections queue until uvicorn accepts them
    config = uvicorn.Config(make_proxy(sandbox_address), log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    print(f"port {sock.getsockname()[1]}", flush=True)
    server.run(sockets=[sock])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--serve-proxy", metavar="ADDRESS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_proxy:
        run_proxy_server(args.serve_proxy)
        return
    if reason := can_make_netns():
        sys.exit(f"bench_proxy: {reason}")

    netns = SandboxNetns()
    proxy, port = serve_proxy(netns.address)
    try:
        envd_host = f"49983-{KNOWN_ID}.e2b.localhost:{port}"
        clients = {
            "direct to sandbox": KeepAliveClient(netns.address, 49983, f"{netns.address}:49983"),
            "through proxy (host routing)": KeepAliveClient("127.0.0.1", port, envd_host),
        }
        samples = latency(clients, args.requests)
        for client in clients.values():
            client.close()
        direct, through = samples.values()
        print(f"GET /health round trip, {len(direct)} requests each, keep-alive, 1 client (ms)")
        print(f"  {'path':<30} {'p50':>7} {'p95':>7} {'p99':>7}")
        for name, values in samples.items():
            p50, p95, p99 = (percentile(values, q) for q in (0.5, 0.95, 0.99))
            print(f"  {name:<30} {p50:7.3f} {p95:7.3f} {p99:7.3f}")
        p50_direct, p50_through = statistics.median(direct), statistics.median(through)
        print(f"  proxy adds {p50_through - p50_direct:.3f} ms at p50 (ratio {p50_through / p50_direct:.2f}x)")

        def to_sandbox() -> KeepAliveClient:
            return KeepAliveClient(netns.address, 8080, netns.address)

        def via_proxy() -> KeepAliveClient:
            return KeepAliveClient("127.0.0.1", port, f"8080-{KNOWN_ID}.e2b.localhost")

        direct_rate, proxy_rate = (parallel_rate(make, 8, 500) for make in (to_sandbox, via_proxy))
        print("GET /health, 8 parallel keep-alive clients (requests/s)")
        print(f"  direct {direct_rate:7.0f}  through proxy {proxy_rate:7.0f}  (ratio {proxy_rate / direct_rate:.2f})")

        print("Streaming throughput, best of 3 (MiB/s)")
        for action, size in (("download", 200 * MIB), ("upload", 100 * MIB)):
            direct_rate, proxy_rate = (throughput(make, action, size) for make in (to_sandbox, via_proxy))
            print(
                f"  {action} {size // MIB} MiB: direct {direct_rate:7.0f}  through proxy {proxy_rate:7.0f}"
                f"  (ratio {proxy_rate / direct_rate:.2f})"
            )
    finally:
        proxy.terminate()
        proxy.wait(timeout=10)
        netns.close()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
