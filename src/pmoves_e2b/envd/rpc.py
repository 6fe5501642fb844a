"""Shared Connect plumbing: strict codecs, OS-error → Connect-code mapping, request user."""

from __future__ import annotations

import errno
from collections.abc import Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from connectrpc.code import Code
from connectrpc.codec import proto_binary_codec, proto_json_codec
from connectrpc.errors import ConnectError

from .users import (
    InvalidPathError,
    UnknownUserError,
    User,
    lookup_user,
    resolve_path,
    username_from_basic_auth,
)

if TYPE_CHECKING:
    from connectrpc.request import RequestContext

    from .state import EnvdState

# Callbacks run when the client of the current request disconnects (set per request by app.py):
# connectrpc notices a gone client only when the next message is sent, so idle streams
# (a quiet process, a watch) register here to end at once instead of at the next keepalive.
DISCONNECT_CALLBACKS: ContextVar[list[Callable[[], None]] | None] = ContextVar("envd_disconnect", default=None)

KEEPALIVE_HEADER = "keepalive-ping-interval"
DEFAULT_KEEPALIVE_SECONDS = 90.0


class StrictCodec:
    """Wraps a connectrpc codec so undecodable bodies become ``invalid_argument``, not ``unknown``."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def name(self) -> str:
        return self._inner.name()

    def encode(self, message: Any) -> bytes:
        return self._inner.encode(message)

    def decode(self, data: bytes | bytearray, message_class: type) -> Any:
        try:
            return self._inner.decode(data, message_class)
        except ConnectError:
            raise
        except Exception as exc:
            raise ConnectError(Code.INVALID_ARGUMENT, f"invalid {self.name()} message: {exc}") from exc


def codecs() -> list[StrictCodec]:
    return [StrictCodec(proto_json_codec()), StrictCodec(proto_binary_codec())]


_ERRNO_CODES = {
    errno.ENOENT: Code.NOT_FOUND,
    errno.EEXIST: Code.ALREADY_EXISTS,
    errno.EACCES: Code.PERMISSION_DENIED,
    errno.EPERM: Code.PERMISSION_DENIED,
    errno.ENOTDIR: Code.INVALID_ARGUMENT,
    errno.EISDIR: Code.INVALID_ARGUMENT,
    errno.EINVAL: Code.INVALID_ARGUMENT,
    errno.ENAMETOOLONG: Code.INVALID_ARGUMENT,
    errno.ELOOP: Code.FAILED_PRECONDITION,
    errno.ENOTEMPTY: Code.FAILED_PRECONDITION,
    errno.EXDEV: Code.FAILED_PRECONDITION,
    errno.ENOSPC: Code.RESOURCE_EXHAUSTED,
}


def connect_error(exc: OSError | ValueError, what: str) -> ConnectError:
    """Map an OS/path error to the Connect code the SDK turns into the matching exception."""
    if isinstance(exc, OSError):
        code = _ERRNO_CODES.get(exc.errno or 0, Code.INTERNAL)
        return ConnectError(code, f"{what}: {exc.strerror or exc}")
    return ConnectError(Code.INVALID_ARGUMENT, f"{what}: {exc}")


def request_user(ctx: RequestContext, state: EnvdState) -> User:
    """The user named in ``Authorization: Basic``, else the sandbox default user."""
    try:
        name = username_from_basic_auth(ctx.request_headers.get("authorization"))
        return lookup_user(name or state.default_user)
    except UnknownUserError as exc:
        raise ConnectError(Code.UNAUTHENTICATED, str(exc)) from exc


def resolve(ctx_path: str, user: User, state: EnvdState) -> str:
    try:
        return resolve_path(ctx_path, user, state.default_workdir)
    except InvalidPathError as exc:
        raise ConnectError(Code.INVALID_ARGUMENT, str(exc)) from exc


def keepalive_interval(ctx: RequestContext) -> float:
    raw = ctx.request_headers.get(KEEPALIVE_HEADER)
    try:
        seconds = float(raw) if raw else DEFAULT_KEEPALIVE_SECONDS
    except ValueError:
        return DEFAULT_KEEPALIVE_SECONDS
    return seconds if seconds > 0 else DEFAULT_KEEPALIVE_SECONDS


def on_client_disconnect(callback: Callable[[], None]) -> None:
    callbacks = DISCONNECT_CALLBACKS.get()
    if callbacks is not None:
        callbacks.append(callback)
