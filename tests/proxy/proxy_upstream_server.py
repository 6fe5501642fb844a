"""A small real server that plays a sandbox's ports in the proxy tests and bench.

Run inside the test network namespace: ``proxy_upstream_server.py <address> <port>[,<port>...]``.
Prints ``ready`` once every port is bound. Endpoints:

- ``GET /health`` 204; ``/init``, ``/freeze`` ... 200 ``{"internal": true}`` (must never be reached)
- ``GET /headers``: the request as seen here (headers, raw path, query, client)
- ``POST /echo``: streams the body back as it arrives
- ``POST /chunks``: answers at once, then one line per body chunk received, then ``end <total>``
- ``POST /sink``: ``{"size", "sha256"}`` of the body
- ``GET /download?size=N``: N bytes of a fixed pattern, streamed
- ``GET /stream``: ``first`` at once, then holds the response open until the client leaves
- ``GET /stats``: counters (clients that left a stream or an upload)
- WebSocket ``/ws``: echo; ``"headers?"`` answers the handshake headers; ``"close-me"`` closes 4001
- port 8081: answers one request per connection, then drops the connection at the next one
- port 8082: answers every request with two responses in one write (a broken or hostile server)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import sys
from typing import Any
from urllib.parse import parse_qs

import uvicorn

PATTERN = bytes(range(256)) * 4096  # 1 MiB
STATS = {"stream_disconnects": 0, "streams_open": 0, "upload_disconnects": 0}
FLAKY_PORT = 8081
DOUBLE_PORT = 8082


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "websocket":
        await websocket_echo(scope, receive, send)
        return
    if scope["type"] != "http":
        return
    path = scope["path"]
    handler = HANDLERS.get(path)
    if handler is None:
        await respond(send, 404, {"message": f"no route {path}"})
        return
    await handler(scope, receive, send)


async def respond(send: Any, status: int, payload: Any = None) -> None:
    body = b"" if payload is None else json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


async def start_stream(send: Any) -> None:
    headers = [(b"content-type", b"application/octet-stream")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})


async def health(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def internal(scope: Any, receive: Any, send: Any) -> None:
    await respond(send, 200, {"internal": True})


async def headers(scope: Any, receive: Any, send: Any) -> None:
    await respond(
        send,
        200,
        {
            "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in scope["headers"]],
            "method": scope["method"],
            "raw_path": scope["raw_path"].decode("latin-1"),
            "query": scope["query_string"].decode("latin-1"),
            "client": list(scope["client"]),
        },
    )


async def echo(scope: Any, receive: Any, send: Any) -> None:
    await start_stream(send)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        await send({"type": "http.response.body", "body": message.get("body", b""), "more_body": True})
        if not message.get("more_body"):
            break
    await send({"type": "http.response.body", "body": b""})


async def chunks(scope: Any, receive: Any, send: Any) -> None:
    await start_stream(send)
    total = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            STATS["upload_disconnects"] += 1
            return
        body = message.get("body", b"")
        total += len(body)
        if body:
            await send({"type": "http.response.body", "body": f"{len(body)}\n".encode(), "more_body": True})
        if not message.get("more_body"):
            break
    await send({"type": "http.response.body", "body": f"end {total}\n".encode()})


async def sink(scope: Any, receive: Any, send: Any) -> None:
    digest = hashlib.sha256()
    size = 0
    while True:
        message = await receive()
        body = message.get("body", b"")
        digest.update(body)
        size += len(body)
        if not message.get("more_body"):
            break
    await respond(send, 200, {"size": size, "sha256": digest.hexdigest()})


async def download(scope: Any, receive: Any, send: Any) -> None:
    size = int(parse_qs(scope["query_string"].decode()).get("size", ["0"])[0])
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(size).encode())]})
    while size > 0:
        piece = PATTERN[: min(size, len(PATTERN))]
        size -= len(piece)
        await send({"type": "http.response.body", "body": piece, "more_body": size > 0})


async def stream(scope: Any, receive: Any, send: Any) -> None:
    await start_stream(send)
    await send({"type": "http.response.body", "body": b"first\n", "more_body": True})
    STATS["streams_open"] += 1
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    finally:
        STATS["streams_open"] -= 1
    STATS["stream_disconnects"] += 1


async def stats(scope: Any, receive: Any, send: Any) -> None:
    await respond(send, 200, STATS)


async def websocket_echo(scope: Any, receive: Any, send: Any) -> None:
    await receive()  # websocket.connect
    if scope["path"] != "/ws":
        await send({"type": "websocket.close", "code": 1008})  # before accept: HTTP 403
        return
    offered = scope.get("subprotocols") or []
    await send({"type": "websocket.accept", "subprotocol": offered[0] if offered else None})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text")
        if text == "headers?":
            seen = {n.decode("latin-1"): v.decode("latin-1") for n, v in scope["headers"]}
            await send({"type": "websocket.send", "text": json.dumps(seen)})
        elif text == "close-me":
            await send({"type": "websocket.close", "code": 4001, "reason": "bye"})
            return
        elif text is not None:
            await send({"type": "websocket.send", "text": text})
        else:
            await send({"type": "websocket.send", "bytes": message["bytes"]})


HANDLERS = {
    "/health": health,
    "/headers": headers,
    "/echo": echo,
    "/chunks": chunks,
    "/sink": sink,
    "/download": download,
    "/stream": stream,
    "/stats": stats,
    **{f"/{name}": internal for name in ("init", "freeze", "unfreeze", "fsfreeze", "fsthaw", "collapse", "upgrade")},
}


async def answer_once_per_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Keep-alive in name only: answers the first request, then drops the connection at the
    next one without answering -- what a sandbox server closing an idle connection looks like
    to a proxy that reuses it at that moment."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.lower().split(b"\r\n")
        length = next((int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length:")), 0)
        body = await reader.readexactly(length)
        answer = json.dumps({"request": head.split(b"\r\n")[0].decode(), "body": body.decode()}).encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))
        await reader.readuntil(b"\r\n\r\n")  # the second request on this connection
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    writer.close()


async def answer_twice(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Every request gets its answer plus a second, unasked-for response right behind it."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            answer = json.dumps({"request": head.split(b"\r\n")[0].decode()}).encode()
            extra = json.dumps({"request": "smuggled"}).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer)
                + b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(extra), extra)
            )
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    writer.close()


async def serve(address: str, ports: list[int]) -> None:
    sockets = []
    for port in ports:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sockets.append(sock)
    flaky = await asyncio.start_server(answer_once_per_connection, address, FLAKY_PORT)
    double = await asyncio.start_server(answer_twice, address, DOUBLE_PORT)
    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_keep_alive=5)
    print("ready", flush=True)
    async with flaky, double:
        await uvicorn.Server(config).serve(sockets=sockets)


def main() -> None:
    asyncio.run(serve(sys.argv[1], [int(p) for p in sys.argv[2].split(",")]))


if __name__ == "__main__":
    main()
