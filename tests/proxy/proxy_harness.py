"""Real parts for the proxy tests and bench: a network namespace playing a sandbox, and uvicorn.

``SandboxNetns`` creates ``e2b-test-proxy-<hex>`` with a veth to the host and runs
``proxy_upstream_server.py`` inside it; ``ServedApp`` serves an ASGI app with uvicorn on a free loopback
port in a background thread. Both clean up completely on ``close()``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn

from pmoves_e2b.sandbox.proxy import SandboxProxy, Target, wait_port

HERE = Path(__file__).resolve().parent
UPSTREAM_PORTS = (49983, 8080, 49999)
KNOWN_ID = "sbxtest1"
DOMAIN = "e2b.localhost"


def can_make_netns() -> str | None:
    """None if this process can create network namespaces, else why not."""
    if os.geteuid() != 0:
        return "needs root to create a network namespace"
    if shutil.which("ip") is None:
        return "needs iproute2 (`ip`)"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def _free_subnet() -> ipaddress.IPv4Network:
    """A /30 in 10.254.0.0/16 that no host route or address uses yet."""
    routes = ["ip", "-4", "route", "show", "table", "all"]
    used = subprocess.run(routes, capture_output=True, text=True, timeout=10).stdout
    taken = []
    for word in used.split():
        try:
            taken.append(ipaddress.ip_network(word, strict=False))
        except ValueError:
            continue
    pool = ipaddress.ip_network("10.254.0.0/16")
    for _ in range(100):
        candidate = list(pool.subnets(new_prefix=30))[random.randrange(16384)]
        if not any(candidate.overlaps(net) for net in taken if net.prefixlen > 0):
            return candidate
    raise RuntimeError("no free /30 in 10.254.0.0/16 for the test namespace")


class SandboxNetns:
    """A network namespace with a veth to the host, serving the test upstream on several ports."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.name = f"e2b-test-proxy-{tag}"
        self.host_if = f"e2btp{tag}"
        self.ns_if = f"e2btq{tag}"
        subnet = _free_subnet()
        hosts = list(subnet.hosts())
        self.host_address, self.address = str(hosts[0]), str(hosts[1])
        self.server: subprocess.Popen[str] | None = None
        _ip("netns", "add", self.name)
        try:
            _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if, "netns", self.name)
            _ip("addr", "add", f"{self.host_address}/30", "dev", self.host_if)
            _ip("link", "set", self.host_if, "up")
            _ip("-n", self.name, "addr", "add", f"{self.address}/30", "dev", self.ns_if)
            _ip("-n", self.name, "link", "set", self.ns_if, "up")
            _ip("-n", self.name, "link", "set", "lo", "up")
            self._start_server()
        except BaseException:
            self.close()
            raise

    def _start_server(self) -> None:
        ports = ",".join(str(p) for p in UPSTREAM_PORTS)
        script = str(HERE / "proxy_upstream_server.py")
        self.server = subprocess.Popen(
            ["ip", "netns", "exec", self.name, sys.executable, script, self.address, ports],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.server.stdout is not None
        if self.server.stdout.readline().strip() != "ready":
            raise RuntimeError("upstream server in the test namespace did not start")
        for port in UPSTREAM_PORTS:
            if not asyncio.run(wait_port(self.address, port, "/health", timeout=20)):
                raise RuntimeError(f"upstream server did not answer on {self.address}:{port}")

    def close(self) -> None:
        if self.server is not None:
            self.server.terminate()
            try:
                self.server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait(timeout=10)
            if self.server.stdout:
                self.server.stdout.close()
            self.server = None
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)


async def control_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Stands in for the REST API: says it was reached."""
    if scope["type"] == "lifespan":
        await receive()  # lifespan.startup
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = json.dumps({"control": True, "path": scope["path"]}).encode()
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def make_proxy(sandbox_address: str, domain: str = "e2b.localhost") -> SandboxProxy:
    targets = {
        KNOWN_ID: Target(sandbox_address),
        "sbxpaused": Target(sandbox_address, state="paused"),
        # A resolver bug must not make the proxy reach the host.
        "sbxloopback": Target("127.0.0.1"),
    }

    async def resolve(sandbox_id: str) -> Target | None:
        return targets.get(sandbox_id)

    return SandboxProxy(control_app, resolve=resolve, domain=domain)


class ServedApp:
    """uvicorn serving ``app`` on a free loopback port, in a background thread."""

    def __init__(self, app: Any, **config: Any) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port: int = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **config))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


def host_for(port: int, sandbox_id: str = KNOWN_ID, suffix: str = "") -> dict[str, str]:
    """Headers that address a sandbox port by host routing."""
    return {"Host": f"{port}-{sandbox_id}.{DOMAIN}{suffix}"}


def via_headers(port: int | str, sandbox_id: str = KNOWN_ID) -> dict[str, str]:
    """Headers that address a sandbox port by header routing."""
    return {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": str(port)}


def raw_request(port: int, method: str, target: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, bytes]:
    """One HTTP/1.1 request over a plain socket, sent exactly as written."""
    lines = [f"{method} {target} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers.items()]
    lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall("\r\n".join(lines).encode() + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), rest


class ConnectionRecorder:
    """Listens on one port of several host addresses and records every connection it gets."""

    def __init__(self, addresses: list[str]) -> None:
        self.accepted: list[tuple[str, int]] = []
        self.stopped = threading.Event()
        self.sockets: list[socket.socket] = []
        self.port = 0
        for address in addresses:
            sock = socket.socket()
            sock.bind((address, self.port))
            self.port = sock.getsockname()[1]
            sock.listen(16)
            sock.settimeout(0.1)
            self.sockets.append(sock)
        self.threads = [threading.Thread(target=self._accept, args=(s,), daemon=True) for s in self.sockets]
        for thread in self.threads:
            thread.start()

    def _accept(self, sock: socket.socket) -> None:
        while not self.stopped.is_set():
            try:
                conn, peer = sock.accept()
            except OSError:  # includes the accept timeout
                continue
            self.accepted.append(peer)
            conn.close()

    def close(self) -> None:
        self.stopped.set()
        for thread in self.threads:
            thread.join(timeout=5)
        for sock in self.sockets:
            sock.close()
