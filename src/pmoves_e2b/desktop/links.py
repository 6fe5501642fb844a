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

from collections.abc import Callable
from typing import Literal

from pmoves_e2b import web_auth
from pmoves_e2b.config import Settings
from pmoves_e2b.web_auth import ALL_SCOPES, Grant, Mode

__all__ = ["ALL_DESKTOPS", "DESKTOP_COOKIE", "SESSION_COOKIE", "TICKET_TTL_S", "Grant", "Kind", "Mode", "Signer"]

Kind = Literal["link", "session", "ticket"]
ALL_DESKTOPS = ALL_SCOPES
TICKET_TTL_S = 60
SESSION_COOKIE = "e2b_desktop_session"
DESKTOP_COOKIE = "e2b_desktop_grant"
PURPOSE = b"pmoves-e2b desktop credentials v1"


class Signer(web_auth.Signer):
    """Credentials of e2b-desktop (the generic signer with the desktop's key)."""

    def __init__(self, token: str) -> None:
        super().__init__(token, PURPOSE)


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
