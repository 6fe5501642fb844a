"""Browser credentials derived from a service's one token, shared by e2b-desktop and e2b-surf.

Programs send ``Authorization: Bearer <token>``. Browsers log in with the token once and get an
HttpOnly, SameSite=Strict cookie; pages that must be opened without it get signed, expiring
credentials. All are ``<expiry>.<mode>.<scope>.<mac>``, an HMAC with a key derived from the token
and the service's ``purpose`` (changing the token revokes every one of them; a credential of one
service is worthless to another). Secrets are compared in constant time and never logged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from starlette.requests import HTTPConnection
from starlette.responses import Response

Mode = Literal["control", "view"]
ALL_SCOPES = "*"
_SCOPE = re.compile(r"^(\*|[A-Za-z0-9_-]{1,128})$")
_MAX_CREDENTIAL = 512


@dataclass(frozen=True)
class Grant:
    """What a verified credential allows: ``scope`` (one id or ``*``) in ``mode`` until ``expires``."""

    scope: str
    mode: Mode
    expires: int

    def covers(self, scope_id: str) -> bool:
        return self.scope == ALL_SCOPES or hmac.compare_digest(self.scope, scope_id)

    @property
    def view_only(self) -> bool:
        return self.mode == "view"


CONTROL_ALL = Grant(ALL_SCOPES, "control", 2**62)


class Signer:
    """Signs and checks credentials of several ``kind``s (a link is never accepted as a session)."""

    def __init__(self, token: str, purpose: bytes) -> None:
        self._key = hmac.new(token.encode(), purpose, hashlib.sha256).digest()

    def _mac(self, kind: str, body: str) -> str:
        digest = hmac.new(self._key, f"{kind}|{body}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def sign(self, kind: str, scope: str, mode: Mode, ttl_s: int, now: float | None = None) -> str:
        if not _SCOPE.match(scope):
            raise ValueError(f"bad credential scope {scope!r}")
        expires = int((now if now is not None else time.time()) + ttl_s)
        body = f"{expires}.{mode}.{scope}"
        return f"{body}.{self._mac(kind, body)}"

    def verify(self, kind: str, value: str | None, now: float | None = None) -> Grant | None:
        """The grant, or None when ``value`` is missing, forged, of another kind or expired."""
        if not value or len(value) > _MAX_CREDENTIAL:
            return None
        body, _, mac = value.rpartition(".")
        if not hmac.compare_digest(mac.encode(), self._mac(kind, body).encode()):
            return None
        expires_text, mode, scope = (body.split(".", 2) + ["", ""])[:3]
        if mode not in ("control", "view") or not expires_text.isdigit() or not _SCOPE.match(scope):
            return None
        expires = int(expires_text)
        if expires < (now if now is not None else time.time()):
            return None
        return Grant(scope, mode, expires)  # type: ignore[arg-type]


class TokenAuth:
    """The token itself (bearer, login form) and the session cookie a login sets."""

    def __init__(self, token: str | None, purpose: bytes, session_cookie: str, session_ttl_s: int) -> None:
        self.token = token
        self.signer = Signer(token, purpose) if token else None
        self.session_cookie_name = session_cookie
        self.session_ttl_s = session_ttl_s

    def token_matches(self, given: str | None) -> bool:
        if not given or not self.token:
            return False
        return hmac.compare_digest(given.encode(), self.token.encode())

    def bearer(self, conn: HTTPConnection) -> Grant | None:
        scheme, _, value = conn.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and self.token_matches(value.strip()):
            return CONTROL_ALL
        return None

    def session(self, conn: HTTPConnection) -> Grant | None:
        if self.signer is None:
            return None
        return self.signer.verify("session", conn.cookies.get(self.session_cookie_name))

    def session_cookie(self) -> str:
        if self.signer is None:
            raise RuntimeError("the service's auth token is not set")
        return self.signer.sign("session", ALL_SCOPES, "control", self.session_ttl_s)

    def log_in(self, response: Response, conn: HTTPConnection) -> Response:
        """Set the session cookie on ``response`` (the caller checked the token)."""
        set_cookie(response, conn, self.session_cookie_name, self.session_cookie(), self.session_ttl_s)
        return response

    def log_out(self, response: Response) -> Response:
        response.delete_cookie(self.session_cookie_name)
        return response


def set_cookie(response: Response, conn: HTTPConnection, name: str, value: str, max_age: int, path: str = "/") -> None:
    response.set_cookie(
        name, value, max_age=max_age, path=path, httponly=True, samesite="strict", secure=is_secure(conn)
    )


def same_origin(conn: HTTPConnection) -> bool:
    """No Origin (not a browser) or an Origin whose host:port is the Host the request came to."""
    origin = conn.headers.get("origin")
    if origin is None:
        return True
    return urlsplit(origin).netloc.lower() == conn.headers.get("host", "").lower()


def safe_next(value: str | None) -> str:
    """Where to go after logging in: only paths on this service, never an absolute URL (open redirect)."""
    if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/"


def is_secure(conn: HTTPConnection) -> bool:
    return conn.url.scheme == "https" or conn.headers.get("x-forwarded-proto") == "https"
