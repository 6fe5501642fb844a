"""Who may do what on e2b-desktop, from ``E2B_DESKTOP_AUTH_TOKEN``.

* Programs: ``Authorization: Bearer <token>`` on every route (full control of every desktop).
* Browsers: logging in with the token (``POST /login``) sets the session cookie (every desktop);
  a signed viewer link (``/desktop/{id}?t=…``) sets a cookie valid for that desktop's pages
  only; the viewer page hands its WebSocket a 60-s ticket for that desktop.

Cookies are HttpOnly and SameSite=Strict. Secrets are compared in constant time and never logged.
"""

from __future__ import annotations

from starlette.requests import HTTPConnection

from pmoves_e2b.desktop.links import DESKTOP_COOKIE, PURPOSE, SESSION_COOKIE, TICKET_TTL_S, Grant, Signer
from pmoves_e2b.web_auth import TokenAuth, same_origin


class DesktopAuth(TokenAuth):
    def __init__(self, token: str | None, link_ttl_s: int, session_ttl_s: int) -> None:
        super().__init__(token, PURPOSE, SESSION_COOKIE, session_ttl_s)
        self.signer: Signer | None = Signer(token) if token else None
        self.link_ttl_s = link_ttl_s

    def browser(self, conn: HTTPConnection, desktop_id: str | None = None) -> Grant | None:
        """Bearer, else the session cookie, else (for one desktop's pages) its desktop cookie."""
        grant = self.bearer(conn) or self.session(conn)
        if grant is not None or self.signer is None:
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
        session = self.session(conn)
        return session if session is not None and session.covers(desktop_id) else None

    def ticket(self, desktop_id: str, grant: Grant) -> str:
        if self.signer is None:
            raise RuntimeError("E2B_DESKTOP_AUTH_TOKEN is not set")
        return self.signer.sign("ticket", desktop_id, grant.mode, TICKET_TTL_S)
