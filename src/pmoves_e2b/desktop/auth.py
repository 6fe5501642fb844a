"""Who may do what on e2b-desktop, from ``E2B_DESKTOP_AUTH_TOKEN``.

* Programs: ``Authorization: Bearer <token>`` on every route (full control of every desktop).
* Browsers: logging in with the token (``POST /login``) sets the session cookie (every desktop);
  a signed viewer link (``/desktop/{id}?t=…``) sets a cookie valid for that desktop's pages
  only; the viewer page hands its WebSocket a 60-s ticket for that desktop.

Cookies are HttpOnly and SameSite=Strict. Secrets are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
from urllib.parse import urlsplit

from starlette.requests import HTTPConnection

from pmoves_e2b.desktop.links import ALL_DESKTOPS, DESKTOP_COOKIE, SESSION_COOKIE, TICKET_TTL_S, Grant, Signer

CONTROL_ALL = Grant(ALL_DESKTOPS, "control", 2**62)


def same_origin(conn: HTTPConnection) -> bool:
    """No Origin (not a browser) or an Origin whose host:port is the Host the request came to."""
    origin = conn.headers.get("origin")
    if origin is None:
        return True
    return urlsplit(origin).netloc.lower() == conn.headers.get("host", "").lower()


class DesktopAuth:
    def __init__(self, token: str | None, link_ttl_s: int, session_ttl_s: int) -> None:
        self.token = token
        self.signer = Signer(token) if token else None
        self.link_ttl_s = link_ttl_s
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

    def browser(self, conn: HTTPConnection, desktop_id: str | None = None) -> Grant | None:
        """Bearer, else the session cookie, else (for one desktop's pages) its desktop cookie."""
        grant = self.bearer(conn)
        if grant is not None or self.signer is None:
            return grant
        grant = self.signer.verify("session", conn.cookies.get(SESSION_COOKIE))
        if grant is not None:
            return grant
        if desktop_id is not None:
            grant = self.signer.verify("link", conn.cookies.get(DESKTOP_COOKIE))
            if grant is not None and grant.covers(desktop_id):
                return grant
        return None

    def link(self, value: str | None, desktop_id: str) -> Grant | None:
        if self.signer is None:
            return None
        grant = self.signer.verify("link", value)
        return grant if grant is not None and grant.covers(desktop_id) else None

    def websocket(self, conn: HTTPConnection, desktop_id: str) -> Grant | None:
        """Bearer, a ticket for this desktop, or the session cookie."""
        grant = self.bearer(conn)
        if grant is not None or self.signer is None:
            return grant
        ticket = self.signer.verify("ticket", conn.query_params.get("ticket"))
        if ticket is not None and ticket.covers(desktop_id):
            return ticket
        if not same_origin(conn):
            return None  # a cookie rides along on cross-site WebSockets: never let it open one
        session = self.signer.verify("session", conn.cookies.get(SESSION_COOKIE))
        return session if session is not None and session.covers(desktop_id) else None

    def _signer(self) -> Signer:
        if self.signer is None:
            raise RuntimeError("E2B_DESKTOP_AUTH_TOKEN is not set")
        return self.signer

    def ticket(self, desktop_id: str, grant: Grant) -> str:
        return self._signer().sign("ticket", desktop_id, grant.mode, TICKET_TTL_S)

    def session_cookie(self) -> str:
        return self._signer().sign("session", ALL_DESKTOPS, "control", self.session_ttl_s)
