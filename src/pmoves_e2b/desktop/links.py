"""Credentials made from ``E2B_DESKTOP_AUTH_TOKEN`` for browsers, which cannot send headers on a WebSocket.

Three kinds, all ``<expiry>.<mode>.<scope>.<mac>`` signed with a key derived from the token
(changing the token revokes every one of them):

* **link** (``?t=`` on ``/desktop/{id}``): handed to people, ``E2B_DESKTOP_LINK_TTL`` seconds;
  opening it sets a desktop cookie and redirects to the clean URL.
* **session** (cookie ``e2b_desktop_session``): set by logging in with the token; every desktop.
* **ticket** (``?ticket=`` on ``/websockify``): made by the viewer page for one desktop, 60 s.

``mode`` is ``control`` or ``view`` (read-only: the relay drops input). Compared in constant time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pmoves_e2b.config import Settings

Mode = Literal["control", "view"]
Kind = Literal["link", "session", "ticket"]
ALL_DESKTOPS = "*"
TICKET_TTL_S = 60
SESSION_COOKIE = "e2b_desktop_session"
DESKTOP_COOKIE = "e2b_desktop_grant"
_SCOPE = re.compile(r"^(\*|[A-Za-z0-9_-]{1,128})$")


@dataclass(frozen=True)
class Grant:
    """What a verified credential allows: ``scope`` (a desktop id or ``*``) in ``mode`` until ``expires``."""

    scope: str
    mode: Mode
    expires: int

    def covers(self, desktop_id: str) -> bool:
        return self.scope == ALL_DESKTOPS or hmac.compare_digest(self.scope, desktop_id)

    @property
    def view_only(self) -> bool:
        return self.mode == "view"


class Signer:
    def __init__(self, token: str) -> None:
        self._key = hmac.new(token.encode(), b"pmoves-e2b desktop credentials v1", hashlib.sha256).digest()

    def _mac(self, kind: Kind, body: str) -> str:
        digest = hmac.new(self._key, f"{kind}|{body}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def sign(self, kind: Kind, scope: str, mode: Mode, ttl_s: int, now: float | None = None) -> str:
        if not _SCOPE.match(scope):
            raise ValueError(f"bad desktop scope {scope!r}")
        expires = int((now if now is not None else time.time()) + ttl_s)
        body = f"{expires}.{mode}.{scope}"
        return f"{body}.{self._mac(kind, body)}"

    def verify(self, kind: Kind, value: str | None, now: float | None = None) -> Grant | None:
        """The grant, or None when ``value`` is missing, forged, of another kind or expired."""
        if not value or len(value) > 512:
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


def viewer_urls(settings: Settings) -> Callable[[str], str]:
    """desktop id -> the viewer URL handed out: under ``E2B_DESKTOP_URL``, signed for ``E2B_DESKTOP_LINK_TTL``."""
    token = settings.secret("E2B_DESKTOP_AUTH_TOKEN")
    base = str(settings.e2b_desktop_url).rstrip("/")

    def url(desktop_id: str) -> str:
        if not token:
            return f"{base}/desktop/{desktop_id}"
        return viewer_link(base, token, desktop_id, settings.e2b_desktop_link_ttl)

    return url


def viewer_link(base_url: str, token: str, desktop_id: str, ttl_s: int, view_only: bool = False) -> str:
    """``<E2B_DESKTOP_URL>/desktop/<id>?t=<signed link>``: opens the viewer without the token."""
    signed = Signer(token).sign("link", desktop_id, "view" if view_only else "control", ttl_s)
    return f"{base_url.rstrip('/')}/desktop/{desktop_id}?t={signed}"
