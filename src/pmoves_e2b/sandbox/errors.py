"""The sandbox domain's errors: one family, turned into ``{code, message}`` with its status once,
at the API's edge (``sandbox/api.py``)."""

from __future__ import annotations


class SandboxError(Exception):
    """An error the API turns into ``{code, message}``."""

    status = 500
    retryable = True

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(SandboxError):
    status = 404
    retryable = False


class Conflict(SandboxError):
    status = 409
    retryable = False


class Lost(SandboxError):
    """The operation ended the sandbox (it is gone: a retry cannot help)."""

    retryable = False


class LimitReached(SandboxError):
    status = 429
    retryable = False


class BadRequest(SandboxError):
    status = 400
    retryable = False


class SignatureRefused(SandboxError):
    """A signed /files URL that no live sandbox signed (or no longer honours); envd's words."""

    status = 401
    retryable = False


class ApiError(SandboxError):
    """A refusal the API itself decides (bad body, bad key, ...), with any status."""

    def __init__(self, status: int, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.status, self.retryable = status, retryable


class Busy(SandboxError):
    """The machine cannot take this create now (boot queue full); the client retries later."""

    status = 503
    retryable = True

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
