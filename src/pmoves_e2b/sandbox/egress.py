"""The egress proxy: domain names in ``allowOut`` / ``denyOut``, matched like E2B does.

A sandbox whose rules name domains gets its outbound TCP to ports 80 and 443 redirected (inside its
own netns, by ``network.open_intercept``) to a listening socket that this service owns. For every
connection the proxy reads the TLS ClientHello's SNI or the HTTP Host header, asks the sandbox's
``decide(host, ip)``, and then either connects to the original destination from the host and
relays bytes both ways, or closes the connection. Nothing is decrypted.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable

log = logging.getLogger(__name__)

SO_ORIGINAL_DST = 80
PEEK_LIMIT = 16 * 1024
PEEK_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10.0

Decide = Callable[[str | None, str, int], bool]  # (host name or None, destination ip, port) -> allowed


def original_destination(sock: socket.socket) -> tuple[str, int]:
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack_from("!H", raw, 2)[0]
    return socket.inet_ntoa(raw[4:8]), port


def tls_server_name(data: bytes) -> str | None:
    """The SNI of a TLS ClientHello (None when ``data`` is not one or has no SNI)."""
    try:
        if len(data) < 5 or data[0] != 0x16:
            return None
        pos = 5
        if data[pos] != 0x01:  # handshake type ClientHello
            return None
        pos += 4 + 2 + 32  # handshake header, client version, random
        pos += 1 + data[pos]  # session id
        pos += 2 + int.from_bytes(data[pos : pos + 2], "big")  # cipher suites
        pos += 1 + data[pos]  # compression methods
        end = pos + 2 + int.from_bytes(data[pos : pos + 2], "big")
        pos += 2
        while pos + 4 <= end:
            kind, length = int.from_bytes(data[pos : pos + 2], "big"), int.from_bytes(data[pos + 2 : pos + 4], "big")
            pos += 4
            if kind == 0:  # server_name: list length, then (type, length, name)
                name_len = int.from_bytes(data[pos + 3 : pos + 5], "big")
                return data[pos + 5 : pos + 5 + name_len].decode("ascii").lower()
            pos += length
    except (IndexError, UnicodeDecodeError):
        return None
    return None


def http_host(data: bytes) -> str | None:
    head = data.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"host":
            host = value.strip().decode("latin-1").lower()
            return host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return None


def _complete(data: bytes) -> bool:
    """Enough bytes to know the host: a whole TLS record, or HTTP headers up to the blank line."""
    if data[:1] == b"\x16":
        return len(data) >= 5 and len(data) >= 5 + int.from_bytes(data[3:5], "big")
    return b"\r\n\r\n" in data


class EgressProxy:
    def __init__(self) -> None:
        self._servers: dict[str, asyncio.Server] = {}

    async def serve(self, sandbox_id: str, sock: socket.socket, decide: Decide) -> None:
        await self.stop(sandbox_id)
        sock.setblocking(False)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._relay(sandbox_id, reader, writer, decide)

        self._servers[sandbox_id] = await asyncio.start_server(handle, sock=sock)

    async def stop(self, sandbox_id: str) -> None:
        server = self._servers.pop(sandbox_id, None)
        if server is not None:
            server.close()

    def serving(self, sandbox_id: str) -> bool:
        return sandbox_id in self._servers

    async def close(self) -> None:
        for sandbox_id in list(self._servers):
            await self.stop(sandbox_id)

    async def _relay(
        self, sandbox_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, decide: Decide
    ) -> None:
        upstream: asyncio.StreamWriter | None = None
        try:
            ip, port = original_destination(writer.get_extra_info("socket"))
            data = b""
            async with asyncio.timeout(PEEK_TIMEOUT_S):
                while len(data) < PEEK_LIMIT and not _complete(data):
                    chunk = await reader.read(PEEK_LIMIT - len(data))
                    if not chunk:
                        break
                    data += chunk
            host = tls_server_name(data) if data[:1] == b"\x16" else http_host(data)
            if not decide(host, ip, port):
                log.info("egress refused", extra={"sandbox_id": sandbox_id, "host": host, "ip": ip, "port": port})
                return
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                up_reader, upstream = await asyncio.open_connection(ip, port)
            upstream.write(data)
            await asyncio.gather(_pipe(reader, upstream), _pipe(up_reader, writer))
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (writer, upstream):
                if w is not None:
                    w.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(64 * 1024):
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.close()
