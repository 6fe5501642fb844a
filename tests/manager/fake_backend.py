"""A root-free ``Backend`` for unit tests of ``SandboxManager``.

Each fake sandbox is a loopback address (127.x.y.z) with a tiny HTTP server on envd's port that
answers every request (the manager's readiness poll and ``/init``), so the manager's real
``EnvdClient`` talks real HTTP. Tests inject failures and look at what the backend was asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import random
import socket
from dataclasses import dataclass, field

from pmoves_e2b.sandbox.backends.base import (
    ENVD_PORT,
    BackendError,
    SandboxHandle,
    SandboxSpec,
    SandboxStats,
)


@dataclass
class FakeEnvd:
    """What envd of one fake sandbox was sent; ``init_status`` is what it answers on /init."""

    server: asyncio.Server
    init_status: int = 204
    inits: list[dict[str, object]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)  # every request, in order


class FakeBackend:
    name = "fake"

    def __init__(self) -> None:
        self.envds: dict[str, FakeEnvd] = {}  # sandbox id -> its envd stand-in (alive sandboxes)
        self.created: list[str] = []
        self.destroyed: list[str] = []
        self.paused: set[str] = set()
        self.internet: dict[str, bool] = {}
        self.orphan_calls: list[set[str]] = []
        self.fail_create: str | None = None  # a BackendError message for the next creates
        self.init_status = 204  # what new sandboxes' envd answers on /init
        self.hold: asyncio.Event | None = None  # when set: creates wait for it (a slow boot)
        self.listen_after: float | None = None  # envd listens this long after create returned

    async def create(self, spec: SandboxSpec) -> SandboxHandle:
        if self.fail_create is not None:
            raise BackendError(self.fail_create)
        if self.hold is not None:
            await self.hold.wait()
        address, envd = await self._serve_envd()
        self.envds[spec.sandbox_id] = envd
        self.created.append(spec.sandbox_id)
        self.internet[spec.sandbox_id] = spec.allow_internet
        return SandboxHandle(spec.sandbox_id, self.name, address, spec.init_secret)

    async def _serve_envd(self) -> tuple[str, FakeEnvd]:
        envd: FakeEnvd | None = None

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            assert envd is not None
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    request_line, *lines = head.decode("latin-1").split("\r\n")
                    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines if h)}
                    body = await reader.readexactly(int(headers.get("content-length", "0")))
                    status = 200
                    envd.paths.append(request_line.split(" ")[1])
                    if request_line.split(" ")[1] == "/init":
                        envd.inits.append(json.loads(body))
                        status = envd.init_status
                    writer.write(f"HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n".encode())
                    await writer.drain()
            writer.close()

        for _ in range(20):  # a random loopback address; 127/8 is all ours without root
            address = str(ipaddress.IPv4Address(0x7F000000 + random.randrange(2, 0xFFFFFE)))
            try:
                server = await asyncio.start_server(handle, address, ENVD_PORT, start_serving=self.listen_after is None)
            except OSError:
                continue
            if self.listen_after is not None:  # bound, but connections are refused until then
                asyncio.get_running_loop().call_later(self.listen_after, _start_serving, server)
            envd = FakeEnvd(server, self.init_status)
            return address, envd
        raise BackendError("no free loopback address for a fake sandbox")

    async def pause(self, handle: SandboxHandle) -> None:
        self.paused.add(handle.sandbox_id)

    async def resume(self, handle: SandboxHandle) -> None:
        self.paused.discard(handle.sandbox_id)

    async def destroy(self, handle: SandboxHandle) -> None:
        self.destroyed.append(handle.sandbox_id)
        envd = self.envds.pop(handle.sandbox_id, None)
        if envd is not None:
            envd.server.close()

    def stop_envd(self, sandbox_id: str) -> None:
        """Only envd is gone: its port refuses, other processes of the sandbox live on."""
        self.envds[sandbox_id].server.close()

    def die(self, sandbox_id: str) -> None:
        """The sandbox's processes are gone (as after a host reboot)."""
        self.envds.pop(sandbox_id).server.close()

    async def set_internet(self, handle: SandboxHandle, allowed: bool) -> None:
        self.internet[handle.sandbox_id] = allowed

    async def set_egress(self, handle: SandboxHandle, allow: tuple[str, ...], deny: tuple[str, ...]) -> None:
        return None

    async def open_intercept(self, handle: SandboxHandle) -> socket.socket:
        raise BackendError("the fake backend has no egress proxy")

    async def close_intercept(self, handle: SandboxHandle) -> None:
        return None

    def never_reachable(self) -> list[ipaddress.IPv4Network]:
        return []

    async def stats(self, handle: SandboxHandle) -> SandboxStats:
        return SandboxStats(1, 0.0, 1 << 20, 512 << 20, 0, 2048 << 20)

    async def is_alive(self, handle: SandboxHandle) -> bool:
        return handle.sandbox_id in self.envds

    async def cleanup_orphans(self, known_ids: set[str]) -> list[str]:
        self.orphan_calls.append(set(known_ids))
        return []

    def close(self) -> None:
        for envd in self.envds.values():
            envd.server.close()
        self.envds.clear()


def _start_serving(server: asyncio.Server) -> None:
    asyncio.ensure_future(server.start_serving())
