"""The control plane's own HTTP calls into a sandbox (readiness, /init) read what a sandbox answers
with bounds: a sandbox is untrusted, its root can replace envd with anything."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from pmoves_e2b.sandbox.backends.base import BackendError
from pmoves_e2b.sandbox.envd_client import ANSWER_LIMIT, _request


async def _serve(answer: bytes, *, endless: bool = False) -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            while endless:
                writer.write(b"x" * 65536)
                await writer.drain()
            await writer.drain()
            await asyncio.sleep(30)  # keeps the connection open: the client must not wait for its end

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_status_and_body_by_content_length_without_waiting_for_the_close() -> None:
    async def main() -> None:
        server, port = await _serve(b"HTTP/1.1 400 Bad\r\nContent-Length: 5\r\n\r\nnope!")
        async with server:
            started = time.monotonic()
            assert await _request("127.0.0.1", port, "POST", "/init", {}, b"{}", 10.0) == (400, b"nope!")
            assert time.monotonic() - started < 5

    asyncio.run(main())


def test_an_endless_answer_is_read_only_up_to_the_limit() -> None:
    async def main() -> None:
        server, port = await _serve(b"HTTP/1.1 500 X\r\n\r\n", endless=True)
        async with server:
            status, body = await _request("127.0.0.1", port, "GET", "/health", {}, b"", 5.0)
            assert status == 500 and len(body) <= ANSWER_LIMIT

    asyncio.run(main())


@pytest.mark.parametrize("answer", [b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 20", b"x" * (ANSWER_LIMIT + 10)])
def test_what_is_not_http_is_a_backend_error(answer: bytes) -> None:
    async def main() -> None:
        server, port = await _serve(answer)
        async with server:
            with pytest.raises((BackendError, TimeoutError)):
                await _request("127.0.0.1", port, "GET", "/health", {}, b"", 2.0)

    asyncio.run(main())
