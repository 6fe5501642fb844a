"""``GET /files`` (download) and ``POST /files`` (multipart or octet-stream upload).

Files are read and written by envd itself (root in the sandbox) and new files and directories
are chowned to the request's user, as in E2B's envd. Errors are JSON ``{code, message}``.
"""

from __future__ import annotations

import errno
import os
import stat
import zlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from ..auth import ACCESS_TOKEN_HEADER, check_signed_request
from ..file_metadata import clear_metadata, replace_metadata
from ..users import (
    InvalidPathError,
    UnknownUserError,
    User,
    chown_to,
    ensure_dirs,
    lookup_user,
    resolve_path,
)
from . import multipart
from .http import ClientDisconnected, HTTPError, Request, Send

if TYPE_CHECKING:
    from ..state import EnvdState

READ_CHUNK = 256 << 10
METADATA_HEADER = "x-metadata-"


def _user(state: EnvdState, request: Request) -> User:
    try:
        return lookup_user(request.query.get("username") or state.default_user)
    except UnknownUserError as exc:
        raise HTTPError(401, str(exc)) from exc


def _resolve(raw: str, user: User, state: EnvdState) -> str:
    try:
        return resolve_path(raw, user, state.default_workdir)
    except InvalidPathError as exc:
        raise HTTPError(400, f"error resolving path: {exc}") from exc


def _authorize(state: EnvdState, request: Request, operation: str) -> None:
    if request.bad_query:
        raise HTTPError(400, "query string is not valid UTF-8")
    refusal = check_signed_request(
        state.access_token,
        request.headers.get(ACCESS_TOKEN_HEADER),
        request.query,
        request.query.get("path", ""),
        operation,
    )
    if refusal:
        raise HTTPError(401, refusal)


def _os_error(exc: OSError, path: str) -> HTTPError:
    if exc.errno == errno.ENOENT:
        return HTTPError(404, f"path '{path}' does not exist")
    if exc.errno in (errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP, errno.ENXIO):
        return HTTPError(400, f"invalid path '{path}': {exc.strerror}")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return HTTPError(401, f"permission denied for '{path}'")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return HTTPError(507, "not enough disk space available")
    return HTTPError(500, f"error accessing '{path}': {exc.strerror or exc}")


# --- download -------------------------------------------------------------------------------


def _wants_gzip(accept_encoding: str) -> bool:
    for item in accept_encoding.split(","):
        name, _, params = item.partition(";")
        if name.strip().lower() not in ("gzip", "x-gzip"):
            continue
        quality = params.strip().lower()
        if not quality.startswith("q="):
            return True
        try:
            return float(quality[2:]) > 0
        except ValueError:
            return False
    return False


async def download(state: EnvdState, request: Request, send: Send) -> None:
    _authorize(state, request, "read")
    user = _user(state, request)
    raw_path = request.query.get("path")
    if not raw_path:
        raise HTTPError(400, "path query parameter is required")
    path = _resolve(raw_path, user, state)
    try:
        # O_NONBLOCK: opening a FIFO must not hang envd; only regular files are served.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except (OSError, ValueError) as exc:
        raise _os_error(exc, path) if isinstance(exc, OSError) else HTTPError(400, str(exc)) from exc
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise HTTPError(400, f"path '{path}' is a directory")
        if not stat.S_ISREG(info.st_mode):
            raise HTTPError(400, f"path '{path}' is not a regular file")
        os.set_blocking(fd, True)
        size = info.st_size
        gzip = _wants_gzip(request.headers.get("accept-encoding", ""))
        name = os.path.basename(path).replace('"', "%22")
        headers = [
            (b"content-type", b"application/octet-stream"),
            (b"content-disposition", f'inline; filename="{name}"'.encode("utf-8", "replace")),
        ]
        if gzip:
            headers.append((b"content-encoding", b"gzip"))
        else:
            headers.append((b"content-length", str(size).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        compressor = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS) if gzip else None
        while chunk := os.read(fd, READ_CHUNK):
            if compressor is not None:
                chunk = compressor.compress(chunk)
                if not chunk:
                    continue
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        tail = compressor.flush() if compressor is not None else b""
        await send({"type": "http.response.body", "body": tail, "more_body": False})
    finally:
        os.close(fd)


# --- upload ---------------------------------------------------------------------------------


class _FileWriter:
    """One uploaded file: parents created (owned by the user), truncated, written, chowned."""

    def __init__(self, path: str, user: User) -> None:
        self.path = path
        try:
            ensure_dirs(os.path.dirname(path), user)
        except NotADirectoryError as exc:
            raise HTTPError(400, str(exc)) from exc
        except OSError as exc:
            raise _os_error(exc, path) from exc
        if os.path.isdir(path):
            raise HTTPError(400, f"path is a directory: {path}")
        try:
            # O_NONBLOCK first: a FIFO in the way must not hang envd (ENXIO without a reader).
            # O_TRUNC at open, as E2B's envd: a watcher sees CREATE, CHMOD (chown), WRITE.
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NONBLOCK
            self._fd = os.open(path, flags, 0o666)
        except OSError as exc:
            raise _os_error(exc, path) from exc
        try:
            if not stat.S_ISREG(os.fstat(self._fd).st_mode):
                raise HTTPError(400, f"path is not a regular file: {path}")
            os.set_blocking(self._fd, True)
            chown_to(path, user)
        except OSError as exc:
            self.close()
            raise _os_error(exc, path) from exc
        except HTTPError:
            self.close()
            raise

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            self.close()
            raise _os_error(exc, self.path) from exc

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _metadata(request: Request) -> dict[str, str] | None:
    found = {
        name[len(METADATA_HEADER) :]: value for name, value in request.raw_headers if name.startswith(METADATA_HEADER)
    }
    return found or None


async def _decoded(request: Request) -> AsyncIterator[bytes]:
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        async for chunk in request.stream():
            yield chunk
        return
    if encoding != "gzip":
        raise HTTPError(400, f"unsupported content encoding: {encoding}")
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        async for chunk in request.stream():
            while chunk:
                out = decompressor.decompress(chunk, READ_CHUNK)
                chunk = decompressor.unconsumed_tail
                if out:
                    yield out
        tail = decompressor.flush()
    except zlib.error as exc:
        raise HTTPError(400, f"error decompressing request body: {exc}") from exc
    if tail:
        yield tail


def _entry(path: str, metadata: dict[str, str] | None) -> dict[str, object]:
    entry: dict[str, object] = {"name": os.path.basename(path), "type": "file", "path": path}
    if metadata is not None:
        entry["metadata"] = {k.lower(): v for k, v in metadata.items()}
    return entry


def _apply_metadata(path: str, metadata: dict[str, str] | None) -> None:
    if metadata is None:
        clear_metadata(path)  # overwriting a file without metadata drops the old one
        return
    try:
        replace_metadata(path, metadata)
    except OSError as exc:
        raise HTTPError(
            400 if exc.errno in (errno.ENOTSUP, errno.E2BIG, errno.ERANGE) else 500,
            f"error setting metadata on '{path}': {exc.strerror}",
        ) from exc


async def upload(state: EnvdState, request: Request) -> list[dict[str, object]]:
    _authorize(state, request, "write")
    user = _user(state, request)
    metadata = _metadata(request)
    content_type = request.headers.get("content-type", "")
    media_type = content_type.partition(";")[0].strip().lower()
    try:
        if media_type == "application/octet-stream":
            return [await _upload_raw(state, request, user, metadata)]
        if media_type.startswith("multipart/"):
            return await _upload_multipart(state, request, user, metadata, content_type)
    except ClientDisconnected as exc:
        raise HTTPError(400, "client disconnected during upload") from exc
    raise HTTPError(
        400, f"unsupported content type: {content_type!r}, expected multipart/form-data or application/octet-stream"
    )


async def _upload_raw(
    state: EnvdState, request: Request, user: User, metadata: dict[str, str] | None
) -> dict[str, object]:
    raw_path = request.query.get("path")
    if not raw_path:
        raise HTTPError(400, "path query parameter is required for raw body upload")
    writer = _FileWriter(_resolve(raw_path, user, state), user)
    try:
        async for chunk in _decoded(request):
            writer.write(chunk)
    finally:
        writer.close()
    _apply_metadata(writer.path, metadata)
    return _entry(writer.path, metadata)


async def _upload_multipart(
    state: EnvdState, request: Request, user: User, metadata: dict[str, str] | None, content_type: str
) -> list[dict[str, object]]:
    written: list[dict[str, object]] = []
    writer: _FileWriter | None = None
    skipping = False
    try:
        async for event in multipart.parse(_decoded(request), multipart.boundary_of(content_type)):
            if isinstance(event, multipart.PartStart):
                field, filename = event.disposition()
                skipping = field != "file"
                if skipping:
                    continue
                target = request.query.get("path") or filename
                if not target:
                    raise HTTPError(400, "file part without a filename and no path query parameter")
                path = _resolve(target, user, state)
                if any(entry["path"] == path for entry in written):
                    raise HTTPError(
                        400, f"you cannot upload multiple files to the same path '{path}' in one upload request"
                    )
                writer = _FileWriter(path, user)
            elif isinstance(event, multipart.PartData):
                if writer is not None:
                    writer.write(event.data)
            elif writer is not None:
                writer.close()
                _apply_metadata(writer.path, metadata)
                written.append(_entry(writer.path, metadata))
                writer = None
    except multipart.MultipartError as exc:
        raise HTTPError(400, f"error parsing multipart form: {exc}") from exc
    finally:
        if writer is not None:
            writer.close()
    if not written:
        raise HTTPError(400, "no file part in the multipart upload")
    return written
