"""Minimal ASGI request/response helpers (envd ships without a web framework)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class HTTPError(Exception):
    """An error answered as E2B's JSON ``{"code", "message"}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ClientDisconnected(Exception):
    """The client went away before the request body was complete."""


class Request:
    def __init__(self, scope: Scope, receive: Receive) -> None:
        self.scope = scope
        self._receive = receive
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.headers: dict[str, str] = {}
        self.raw_headers: list[tuple[str, str]] = []
        for key, value in scope.get("headers", ()):
            name, text = key.decode("latin-1").lower(), value.decode("latin-1")
            self.headers[name] = text
            self.raw_headers.append((name, text))
        try:
            query = scope.get("query_string", b"").decode()
            parsed = parse_qs(query, keep_blank_values=True, errors="strict")
            self.query = {k: v[-1] for k, v in parsed.items()}
        except UnicodeDecodeError:
            self.query = {}
            self.bad_query = True
        else:
            self.bad_query = False

    async def stream(self) -> AsyncIterator[bytes]:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected
            body = message.get("body", b"")
            if body:
                yield body
            if not message.get("more_body", False):
                return

    async def body(self, limit: int) -> bytes:
        chunks: list[bytes] = []
        size = 0
        async for chunk in self.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPError(413, f"request body larger than {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def json(self, limit: int) -> Any:
        raw = await self.body(limit)
        try:
            return json.loads(raw) if raw.strip() else {}
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HTTPError(400, f"invalid JSON body: {exc}") from exc


async def send_response(
    send: Send, status: int, body: bytes = b"", headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    all_headers = list(headers or [])
    all_headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_json(send: Send, status: int, payload: Any) -> None:
    body = json.dumps(payload).encode()
    await send_response(send, status, body, [(b"content-type", b"application/json")])


async def send_error(send: Send, status: int, message: str) -> None:
    await send_json(send, status, {"code": status, "message": message})
