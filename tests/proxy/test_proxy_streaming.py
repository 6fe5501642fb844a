"""Bodies stream through the proxy both ways as they arrive, at any size, for as long as needed."""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Iterator

import httpx
from proxy.proxy_harness import KNOWN_ID, host_for, via_headers
from proxy.proxy_upstream_server import PATTERN as PATTERN_MIB

MIB = 1024 * 1024


class ChunkedResponse:
    """Reads a chunked HTTP/1.1 response from a socket line by line, as the bytes arrive."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.raw = b""
        self.body = b""
        self.head = self._until(b"\r\n\r\n")

    def _until(self, marker: bytes) -> bytes:
        while marker not in self.raw:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("proxy closed the connection")
            self.raw += data
        found, _, self.raw = self.raw.partition(marker)
        return found

    def line(self) -> bytes:
        while b"\n" not in self.body:
            size = int(self._until(b"\r\n"), 16)
            while len(self.raw) < size + 2:
                self.raw += self.sock.recv(65536)
            self.body += self.raw[:size]
            self.raw = self.raw[size + 2 :]
        line, _, self.body = self.body.partition(b"\n")
        return line


def test_chunked_upload_reaches_the_sandbox_before_it_ends(proxy_port: int) -> None:
    # Like the SDK's client-streaming RPCs over HTTP/1.1: the server answers each chunk
    # while the upload is still open, so each answer proves the chunk went through at once.
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as sock:
        head = f"POST /chunks HTTP/1.1\r\nHost: 8080-{KNOWN_ID}.e2b.localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
        sock.sendall(head.encode())
        response = None
        for size in (5, 300, 70000):
            sock.sendall(f"{size:x}\r\n".encode() + b"x" * size + b"\r\n")
            response = response or ChunkedResponse(sock)
            received = 0
            while received < size:  # the server may see a chunk in pieces
                received += int(response.line())
            assert received == size
        sock.sendall(b"0\r\n\r\n")
        assert response is not None and response.line() == b"end 70305"


def wait_for_stat(client: httpx.Client, name: str, above: int) -> None:
    deadline = time.monotonic() + 10
    while client.get("/stats", headers=host_for(8080)).json()[name] <= above:
        assert time.monotonic() < deadline, f"the sandbox never saw the client leave ({name})"
        time.sleep(0.02)


def test_client_leaving_mid_upload_reaches_the_sandbox(client: httpx.Client, proxy_port: int) -> None:
    before = client.get("/stats", headers=host_for(8080)).json()["upload_disconnects"]
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as sock:
        head = f"POST /chunks HTTP/1.1\r\nHost: 8080-{KNOWN_ID}.e2b.localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
        sock.sendall(head.encode() + b"3\r\nabc\r\n")
        assert ChunkedResponse(sock).line() == b"3"
    wait_for_stat(client, "upload_disconnects", before)


def test_server_stream_is_not_buffered_and_ends_when_client_leaves(client: httpx.Client) -> None:
    before = client.get("/stats", headers=host_for(8080)).json()["stream_disconnects"]
    with client.stream("GET", "/stream", headers=host_for(8080), timeout=10) as response:
        assert response.status_code == 200
        first = next(response.iter_raw())  # the sandbox holds the rest: only arrives if unbuffered
        assert first == b"first\n"
    wait_for_stat(client, "stream_disconnects", before)


def pattern(total: int) -> Iterator[bytes]:
    while total > 0:
        piece = PATTERN_MIB[: min(total, MIB)]
        total -= len(piece)
        yield piece


def test_100_mb_download(client: httpx.Client) -> None:
    size = 100 * MIB
    digest, received = hashlib.sha256(), 0
    with client.stream("GET", "/download", params={"size": size}, headers=host_for(49983)) as response:
        assert response.headers["content-length"] == str(size)
        for chunk in response.iter_raw():
            digest.update(chunk)
            received += len(chunk)
    expected = hashlib.sha256(b"".join(pattern(size))).hexdigest()
    assert received == size and digest.hexdigest() == expected


def test_100_mb_upload_streamed(client: httpx.Client) -> None:
    size = 100 * MIB
    response = client.post("/sink", content=pattern(size), headers=via_headers(49983))  # chunked
    expected = hashlib.sha256(b"".join(pattern(size))).hexdigest()
    assert response.json() == {"size": size, "sha256": expected}


def test_upload_with_content_length(client: httpx.Client) -> None:
    body = b"abc" * 100_000
    response = client.post("/sink", content=body, headers=via_headers(49983))
    assert response.json() == {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}


def test_echo_streams_both_ways(client: httpx.Client) -> None:
    body = b"".join(pattern(5 * MIB))
    response = client.post("/echo", content=iter([body[:MIB], body[MIB:]]), headers=host_for(8080))
    assert response.content == body


def test_head_and_empty_responses_keep_the_connection_usable(client: httpx.Client) -> None:
    assert client.head("/download", params={"size": 10}, headers=host_for(8080)).headers["content-length"] == "10"
    assert client.get("/health", headers=host_for(8080)).status_code == 204


def test_expect_100_continue_upload(proxy_port: int) -> None:
    body = b"y" * 200_000
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as sock:
        head = (
            f"POST /sink HTTP/1.1\r\nHost: 49983-{KNOWN_ID}.e2b.localhost\r\nContent-Length: {len(body)}\r\n"
            "Expect: 100-continue\r\nConnection: close\r\n\r\n"
        )
        sock.sendall(head.encode())
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200")
    assert hashlib.sha256(body).hexdigest().encode() in data


def test_client_leaving_mid_download_leaves_the_proxy_healthy(client: httpx.Client) -> None:
    for _ in range(3):
        with client.stream("GET", "/download", params={"size": 50 * MIB}, headers=host_for(8080)) as response:
            next(response.iter_raw())
    assert client.get("/download", params={"size": 1000}, headers=host_for(8080)).content == PATTERN_MIB[:1000]
