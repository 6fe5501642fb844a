"""A streaming ``multipart/form-data`` parser: parts' bodies are never held in memory whole."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

MAX_HEADER_BYTES = 16 << 10
_PARAM = re.compile(r';\s*([\w*-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


class MultipartError(ValueError):
    """The body is not valid multipart."""


@dataclass
class PartStart:
    headers: dict[str, str]

    def disposition(self) -> tuple[str | None, str | None]:
        """(form field name, filename) from ``Content-Disposition``."""
        params: dict[str, str] = {}
        for key, value in _PARAM.findall(self.headers.get("content-disposition", "")):
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            params[key.lower()] = value
        return params.get("name"), params.get("filename")


@dataclass
class PartData:
    data: bytes


class PartEnd:
    pass


def boundary_of(content_type: str) -> bytes:
    for key, value in _PARAM.findall(";" + content_type.partition(";")[2]):
        if key.lower() == "boundary":
            boundary = value.strip('"')
            if 0 < len(boundary) <= 200:
                return boundary.encode("latin-1")
    raise MultipartError("multipart body without a boundary")


async def parse(stream: AsyncIterator[bytes], boundary: bytes) -> AsyncIterator[PartStart | PartData | PartEnd]:
    delimiter = b"\r\n--" + boundary
    keep = len(delimiter) + 1
    buffer = b"\r\n"  # so the first boundary matches the same delimiter as the others
    state = "preamble"
    finished = False
    async for chunk in stream:
        if finished:
            continue  # epilogue: ignored
        buffer += chunk
        while True:
            if state == "preamble":
                index = buffer.find(delimiter)
                if index < 0:
                    buffer = buffer[-keep:]
                    break
                buffer, state = buffer[index + len(delimiter) :], "after-delimiter"
            elif state == "after-delimiter":
                if len(buffer) < 2:
                    break
                if buffer.startswith(b"--"):
                    finished = True
                    break
                line_end = buffer.find(b"\r\n")
                if line_end < 0:
                    if len(buffer) > 1024:
                        raise MultipartError("malformed boundary line")
                    break
                if buffer[:line_end].strip(b" \t"):
                    raise MultipartError("malformed boundary line")
                buffer, state = buffer[line_end + 2 :], "headers"
            elif state == "headers":
                index = buffer.find(b"\r\n\r\n")
                if index < 0:
                    if buffer.startswith(b"\r\n"):  # a part with no headers at all
                        index = -2
                    elif len(buffer) > MAX_HEADER_BYTES:
                        raise MultipartError("part headers too large")
                    else:
                        break
                yield PartStart(_headers(buffer[: max(index, 0)]))
                buffer, state = buffer[index + 4 :], "body"
            else:  # body
                index = buffer.find(delimiter)
                if index < 0:
                    safe = len(buffer) - keep
                    if safe > 0:
                        yield PartData(buffer[:safe])
                        buffer = buffer[safe:]
                    break
                if index:
                    yield PartData(buffer[:index])
                yield PartEnd()
                buffer, state = buffer[index + len(delimiter) :], "after-delimiter"
    if not finished:
        raise MultipartError("multipart body ended before its closing boundary")


def _headers(raw: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in raw.decode("utf-8", "replace").split("\r\n"):
        name, sep, value = line.partition(":")
        if not sep:
            raise MultipartError(f"malformed part header: {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    return headers
