"""Kernel messages as E2B's NDJSON lines, and the bounded buffer they wait in for the client."""

from __future__ import annotations

import asyncio
import json
from collections import deque
from datetime import UTC, datetime
from typing import Any

# MIME type -> field of the SDK's Result; anything else goes to `extra`.
RESULT_FIELDS = {
    "text/plain": "text",
    "text/html": "html",
    "text/markdown": "markdown",
    "image/svg+xml": "svg",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "application/pdf": "pdf",
    "text/latex": "latex",
    "application/json": "json",
    "application/javascript": "javascript",
    "e2b/data": "data",
    "e2b/chart": "chart",
}

KEEPALIVE = b'{"type": "keepalive"}\n'
END_OF_EXECUTION = b'{"type": "end_of_execution"}\n'


def encode(line: dict[str, Any]) -> bytes:
    return json.dumps(line, ensure_ascii=False, default=str).encode() + b"\n"


def _timestamp(msg: dict[str, Any]) -> str:
    date = msg["header"].get("date")
    if isinstance(date, datetime):
        return date.isoformat()
    return datetime.now(UTC).isoformat()


def result_line(data: dict[str, Any], is_main_result: bool) -> dict[str, Any]:
    line: dict[str, Any] = {"type": "result"}
    extra: dict[str, Any] = {}
    for mime, value in data.items():
        field = RESULT_FIELDS.get(mime)
        if field is None:
            extra[mime] = value
        else:
            line[field] = value
    text = line.get("text")
    # E2B shows a string result without its repr quotes.
    if isinstance(text, str) and len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        line["text"] = text[1:-1]
    if extra:
        line["extra"] = extra
    line["is_main_result"] = is_main_result
    return line


def error_line(name: str, value: str, traceback: list[str] | str) -> dict[str, Any]:
    text = traceback if isinstance(traceback, str) else "\n".join(traceback)
    return {"type": "error", "name": name, "value": value, "traceback": text}


def droppable_size(msg: dict[str, Any]) -> int | None:
    """About how many bytes an output message will take, or None if it must never be dropped."""
    kind = msg["msg_type"]
    if kind == "stream":
        return len(msg["content"].get("text", "")) + 100
    if kind in ("execute_result", "display_data"):
        data = msg["content"].get("data") or {}
        return sum(len(v) if isinstance(v, str) else 1000 for v in data.values()) + 200
    return None


def output_line(msg: dict[str, Any]) -> dict[str, Any] | None:
    """The NDJSON line for an iopub message, or None for messages the client does not get."""
    kind = msg["msg_type"]
    content = msg["content"]
    if kind == "stream":
        name = "stderr" if content.get("name") == "stderr" else "stdout"
        return {"type": name, "text": content.get("text", ""), "timestamp": _timestamp(msg)}
    if kind in ("execute_result", "display_data"):
        return result_line(dict(content.get("data") or {}), kind == "execute_result")
    if kind == "error":
        return error_line(content.get("ename", ""), content.get("evalue", ""), content.get("traceback") or [])
    if kind == "execute_input":
        return {"type": "number_of_executions", "execution_count": content.get("execution_count")}
    return None


class OutputBuffer:
    """Lines between the kernel reader and the HTTP writer, bounded in bytes.

    A cell that prints forever must not grow the server: past `limit_bytes` waiting to be sent,
    streams and results are counted and dropped (checked with `has_room` before they are even
    encoded), and the client is told how much it missed. Once the client is gone, everything is
    dropped.
    """

    def __init__(self, limit_bytes: int) -> None:
        self._limit = limit_bytes
        self._lines: deque[bytes] = deque()
        self._size = 0
        self._dropped_bytes = 0
        self._finished = False
        self._closed = False
        self._ready = asyncio.Event()

    def has_room(self, size: int) -> bool:
        """Whether `size` more bytes fit; if not, they count as dropped (call before encoding)."""
        if self._closed:
            return False
        if self._size + size > self._limit:
            self._dropped_bytes += size
            return False
        return True

    def put(self, line: bytes) -> None:
        if self._closed:
            return
        self._lines.append(line)
        self._size += len(line)
        self._ready.set()

    def finish(self) -> None:
        self._finished = True
        self._ready.set()

    def close(self) -> None:
        self._closed = True
        self._lines.clear()
        self._size = 0

    async def get(self, wait_seconds: float) -> bytes | None:
        """The next line, KEEPALIVE after `wait_seconds` without one, or None at the end."""
        if not self._lines and not self._finished:
            self._ready.clear()
            try:
                async with asyncio.timeout(wait_seconds):
                    await self._ready.wait()
            except TimeoutError:
                return KEEPALIVE
        if self._dropped_bytes and self._size < self._limit // 2:
            dropped, self._dropped_bytes = self._dropped_bytes, 0
            notice = f"[pmoves-e2b] {dropped} bytes of output were dropped: the client read too slowly\n"
            now = datetime.now(UTC).isoformat()
            return encode({"type": "stderr", "text": notice, "timestamp": now})
        if self._lines:
            line = self._lines.popleft()
            self._size -= len(line)
            return line
        return None
