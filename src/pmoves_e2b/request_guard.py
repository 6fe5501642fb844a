"""Request bodies every service refuses before a handler sees them: too large (413) or JSON
nested deeper than any real request needs (400; CPython's decoder would raise RecursionError).

Pure ASGI, so it also covers routes that read the body by hand (MCP transports, desktop actions).
The data-plane proxy of e2b-sandbox sits outside the app this wraps, so uploads to sandboxes
are not limited here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_REQUEST_BODY_BYTES = 4 << 20
MAX_JSON_DEPTH = 256

ErrorBody = Callable[[int, str, str], dict[str, Any]]


def pmoves_error(status: int, code: str, message: str) -> dict[str, Any]:
    """The upper services' error shape."""
    return {"error": code, "detail": message}


def json_depth_exceeds(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when ``body`` opens more than ``limit`` arrays/objects at once (strings skipped)."""
    if body.count(b"[") + body.count(b"{") <= limit:  # the common case costs two C scans
        return False
    depth = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return False


class RequestGuard:
    """Buffers each HTTP request body (bounded), refuses it when too large or too deep, then
    replays it to the app."""

    def __init__(
        self, app: ASGIApp, *, error_body: ErrorBody = pmoves_error, max_bytes: int = MAX_REQUEST_BODY_BYTES
    ) -> None:
        self.app = app
        self.error_body = error_body
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(send, 413, "payload_too_large", self._too_large())
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send, 413, "payload_too_large", self._too_large())
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if json_depth_exceeds(body):
            detail = f"the JSON body is nested deeper than {MAX_JSON_DEPTH} levels"
            await self._refuse(send, 400, "invalid_request", detail)
            return
        await self.app(scope, _replay(body, receive), send)

    def _too_large(self) -> str:
        return f"the request body is larger than {self.max_bytes} bytes"

    async def _refuse(self, send: Send, status: int, code: str, detail: str) -> None:
        payload = json.dumps(self.error_body(status, code, detail)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        if status == 413:
            headers.append((b"connection", b"close"))  # the unread rest of the body is not drained
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later calls wait for the disconnect, as the server's receive does

    return replay
