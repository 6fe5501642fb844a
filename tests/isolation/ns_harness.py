"""Helpers for the ns backend's isolation tests: a client for the in-sandbox test agent and
host-side network stand-ins (listeners inside a netns, the fake internet's addresses)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import http.client
import json
import os
import secrets
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from leakcheck import ns_leftovers

from pmoves_e2b.sandbox.backends.base import ENVD_PORT, SandboxHandle, SandboxSpec, TemplateImage
from pmoves_e2b.sandbox.backends.ns import NsBackend

ID_PREFIX = f"it{os.getpid()}"


def sandboxes_for_test(backend: NsBackend, template: TemplateImage) -> Iterator[Sandboxes]:
    """A fixture's body: the test's Sandboxes, destroyed afterwards, with nothing left behind."""
    box = Sandboxes(backend, template)
    yield box
    for handle in box.handles:
        asyncio.run(backend.destroy(handle))
    left = ns_leftovers(
        backend.runtime_dir,
        backend.cgroup_parent_name,
        ID_PREFIX,
        box.slots,
        peer_roots=(backend.launch_root,),
        kept=backend.free_slots(),
    )
    assert not left, f"left behind after the test: {left}"


class Sandboxes:
    """Creates sandboxes for one test, remembers them, and destroys them at the end."""

    def __init__(self, backend: NsBackend, template: TemplateImage) -> None:
        self.backend = backend
        self.template = template
        self.handles: list[SandboxHandle] = []
        self.slots: set[int] = set()
        self._count = 0

    def spec(self, **overrides: Any) -> SandboxSpec:
        self._count += 1
        values: dict[str, Any] = {
            "sandbox_id": f"{ID_PREFIX}-{secrets.token_hex(3)}-{self._count}",
            "template": self.template,
            "memory_mb": 256,
            "cpu_count": 1.0,
            "disk_mb": 64,
            "allow_internet": False,
            "init_secret": secrets.token_hex(16),
        }
        values.update(overrides)
        return SandboxSpec(**values)

    def create(self, backend: NsBackend | None = None, **overrides: Any) -> SandboxHandle:
        handle = asyncio.run((backend or self.backend).create(self.spec(**overrides)))
        self.track(handle)
        return handle

    def track(self, handle: SandboxHandle) -> None:
        self.handles.append(handle)
        self.slots.add(handle.details["slot"])

    def destroy(self, handle: SandboxHandle) -> None:
        asyncio.run(self.backend.destroy(handle))

    def run(self, handle: SandboxHandle, *argv: str, uid: int = 0, timeout: float = 30) -> dict[str, Any]:
        """Run a command inside through the agent; returns {"rc", "stdout", "stderr"}."""
        conn = http.client.HTTPConnection(handle.address, ENVD_PORT, timeout=timeout + 10)
        try:
            body = json.dumps({"argv": list(argv), "uid": uid, "timeout": timeout})
            conn.request("POST", "/run", body=body, headers={"Content-Type": "application/json"})
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def python(self, handle: SandboxHandle, code: str, uid: int = 0, timeout: float = 30) -> dict[str, Any]:
        return self.run(handle, "/usr/bin/python3", "-c", code, uid=uid, timeout=timeout)


_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def listening_socket_in_netns(netns_path: Path | None, address: str, port: int = 0) -> socket.socket:
    """A TCP listener on ``address`` (port 0: any free one) created inside a netns (None = the host's)."""
    result: list[Any] = []

    def worker() -> None:
        try:
            if netns_path is not None:
                fd = os.open(netns_path, os.O_RDONLY)
                try:
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns")
                finally:
                    os.close(fd)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, port))
            sock.listen(16)
            result.append(sock)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            result.append(exc)

    # setns is per thread; the thread ends, the socket stays in the netns it was made in
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


class Responder:
    """Accepts connections on a socket and answers each with the peer address it saw."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.port = sock.getsockname()[1]
        self.peers: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            with conn:
                self.peers.append(peer[0])
                conn.sendall(f"hello {peer[0]}\n".encode())

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(timeout=5)


FAKE_INTERNET_NETNS = f"e2b-test-inet{os.getpid() % 100000}"
FAKE_INTERNET_HOST_VETH = f"e2bti{os.getpid() % 100000}"
# TEST-NET-2, not TEST-NET-3: on the CI machine the package registries (PyPI, npm, Debian) answer at
# 203.0.113.80, and a fake internet there cut the host off from them while it existed.
FAKE_INTERNET_HOST_IP = "198.51.100.1"
FAKE_INTERNET_SERVER_IP = "198.51.100.80"


FAKE_INTERNET_LOCK = Path("/run/lock/pmoves-e2b-fake-internet.lock")


@contextlib.contextmanager
def _fake_internet_lock() -> Iterator[None]:
    """Its host address is fixed, so two test processes (a CI run and a developer's) take turns."""
    FAKE_INTERNET_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with FAKE_INTERNET_LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def fake_internet_netns() -> Iterator[Path]:
    """The "fake internet": a netns at FAKE_INTERNET_SERVER_IP (TEST-NET-2), routed from the host
    through a veth; yields the netns path (listeners go in with ``listening_socket_in_netns``).
    One at a time per process; other processes wait for it (``_fake_internet_lock``)."""
    with _fake_internet_lock():
        yield from _fake_internet_netns()


def _fake_internet_netns() -> Iterator[Path]:
    script = (
        f"netns add {FAKE_INTERNET_NETNS}\n"
        f"link add {FAKE_INTERNET_HOST_VETH} type veth peer name eth0 netns {FAKE_INTERNET_NETNS}\n"
        f"addr add {FAKE_INTERNET_HOST_IP}/24 dev {FAKE_INTERNET_HOST_VETH}\n"
        f"link set {FAKE_INTERNET_HOST_VETH} up\n"
    )
    subprocess.run(["ip", "-batch", "-"], input=script.encode(), check=True)
    try:
        subprocess.run(
            ["ip", "-n", FAKE_INTERNET_NETNS, "-batch", "-"],
            input=(
                f"addr add {FAKE_INTERNET_SERVER_IP}/24 dev eth0\nlink set eth0 up\nlink set lo up\n"
                f"route add default via {FAKE_INTERNET_HOST_IP}\n"
            ).encode(),
            check=True,
        )
        yield Path("/run/netns") / FAKE_INTERNET_NETNS
    finally:
        subprocess.run(["ip", "link", "del", FAKE_INTERNET_HOST_VETH], check=False)
        subprocess.run(["ip", "netns", "del", FAKE_INTERNET_NETNS], check=True)
