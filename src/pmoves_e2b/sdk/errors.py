"""What a failed stock-SDK call means, decided once for every feature that calls the SDK
(desktops, the MCP server's sandbox tools, spells): each maps the kind to its own words.

A kind's HTTP status (``Failure.status``) is the same everywhere; a feature may leave a kind to
its generic answer (e.g. spells have no 422 of their own).
"""

from __future__ import annotations

from enum import Enum

import httpx
from e2b import exceptions as e2b_errors


class Failure(Enum):
    NOT_FOUND = "not_found"  # the sandbox (or a path in it) does not exist
    NOT_RUNNING = "not_running"  # the sandbox ended (SandboxNotRunningException, a TimeoutException)
    AUTH = "auth"  # the backend refused E2B_API_KEY: our configuration, not the caller's request
    TIMEOUT = "timeout"
    LIMIT = "limit"  # a sandbox limit of the backend
    INVALID = "invalid"  # the backend found the request invalid
    UNREACHABLE = "unreachable"  # no answer from the backend (transport error)
    SANDBOX = "sandbox"  # any other error the SDK reports about the sandbox or the request
    OTHER = "other"  # anything else: a defect or an unexpected answer

    @property
    def gone(self) -> bool:
        """The sandbox is not there (any more)."""
        return self in (Failure.NOT_FOUND, Failure.NOT_RUNNING)

    @property
    def status(self) -> int:
        return STATUS[self]


# A feature may answer SANDBOX as a backend error (desktops: 502) instead.
STATUS = {
    Failure.NOT_FOUND: 404,
    Failure.NOT_RUNNING: 504,  # when no sandbox id is known; with one it is a 404 like NOT_FOUND
    Failure.AUTH: 502,
    Failure.TIMEOUT: 504,
    Failure.LIMIT: 429,
    Failure.INVALID: 422,
    Failure.UNREACHABLE: 503,
    Failure.SANDBOX: 400,
    Failure.OTHER: 502,
}


def classify(exc: BaseException) -> Failure:
    # SandboxNotRunningException is a TimeoutException and NotFoundException a SandboxException:
    # the specific ones first.
    if isinstance(exc, e2b_errors.NotFoundException):
        return Failure.NOT_FOUND
    if isinstance(exc, e2b_errors.SandboxNotRunningException):
        return Failure.NOT_RUNNING
    if isinstance(exc, e2b_errors.AuthenticationException):
        return Failure.AUTH
    if isinstance(exc, e2b_errors.TimeoutException):
        return Failure.TIMEOUT
    if isinstance(exc, e2b_errors.RateLimitException):
        return Failure.LIMIT
    if isinstance(exc, e2b_errors.InvalidArgumentException):
        return Failure.INVALID
    if isinstance(exc, (httpx.TransportError, OSError)):
        return Failure.UNREACHABLE
    if isinstance(exc, e2b_errors.SandboxException):
        return Failure.SANDBOX
    return Failure.OTHER
