"""The browser pages of e2b-desktop: the desktops listing (``/``), the viewer (``/desktop/{id}``), sign-in.

Without a credential a page answers 401 with a sign-in form (paste the token) instead of a
bare error; an expired or forged viewer link says so. A valid link sets a cookie for that
desktop's pages and redirects to the clean URL, so the credential does not stay in the
address bar. The viewer gets a 60-s WebSocket ticket in the page and fetches fresh ones
(``/desktop/{id}/ticket``) to reconnect.
"""

from __future__ import annotations

import html
import json
from datetime import datetime
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from pmoves_e2b.desktop.assets import novnc_ready
from pmoves_e2b.desktop.auth import DesktopAuth
from pmoves_e2b.desktop.desktops import Desktop, DesktopError, DesktopOps, utcnow
from pmoves_e2b.desktop.links import DESKTOP_COOKIE, Grant
from pmoves_e2b.web_auth import safe_next, set_cookie

SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "SAMEORIGIN",
    # Everything comes from this service (noVNC included); the viewer's WebSocket is same-origin.
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; connect-src 'self' ws: wss:; object-src 'none'; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'self'"
    ),
}


FAVICON = (
    "data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 16 16'%3E%3Crect width='16' "
    "height='16' rx='4' fill='%233fb68b'/%3E%3C/svg%3E"
)


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def framed_headers(framers: str) -> dict[str, str]:
    """The headers of a viewer page that e2b-surf's UI (``framers``: its origin) may embed."""
    if not framers:
        return SECURITY_HEADERS
    headers = {k: v for k, v in SECURITY_HEADERS.items() if k != "X-Frame-Options"}
    headers["Content-Security-Policy"] = headers["Content-Security-Policy"].replace(
        "frame-ancestors 'self'", f"frame-ancestors 'self' {framers}"
    )
    return headers


def page(title: str, body: str, status: int = 200, body_class: str = "", framers: str = "") -> HTMLResponse:
    document = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title><link rel="icon" href="{FAVICON}">
<link rel="stylesheet" href="/static/desktop.css"></head>
<body class="{body_class}">{body}</body></html>"""
    return HTMLResponse(document, status_code=status, headers=framed_headers(framers))


def bar(extra: str = "", signed_in: bool = False) -> str:
    logout = '<form method="post" action="/logout"><button type="submit">Sign out</button></form>' if signed_in else ""
    brand = '<a class="brand" href="/">e2b-desktop</a>'
    return f'<header class="bar">{brand}{extra}<span class="spacer"></span>{logout}</header>'


def sign_in(next_path: str, notice: str = "", status: int = 401, framers: str = "") -> HTMLResponse:
    message = f'<p class="notice">{_e(notice)}</p>' if notice else ""
    body = f"""{bar()}<main class="center"><form class="panel" method="post" action="/login">
<h1>Sign in to view desktops</h1>{message}
<p>Paste the desktop access token (<span class="mono">E2B_DESKTOP_AUTH_TOKEN</span>; by default in
<span class="mono">$E2B_DATA_DIR/secrets/</span>), or open a viewer link you were given.</p>
<input type="password" name="token" placeholder="Access token" autocomplete="current-password" autofocus required>
<input type="hidden" name="next" value="{_e(next_path)}">
<button class="primary" type="submit">Sign in</button></form></main>"""
    return page("Sign in · e2b-desktop", body, status, framers=framers)


def message_page(title: str, text: str, status: int, signed_in: bool = True, framers: str = "") -> HTMLResponse:
    body = f"""{bar(signed_in=signed_in)}<main class="center"><div class="panel"><h1>{_e(title)}</h1>
<p>{_e(text)}</p><a class="button" href="/">All desktops</a></div></main>"""
    return page(f"{title} · e2b-desktop", body, status, framers=framers)


def _age(moment: datetime) -> str:
    seconds = int((moment - utcnow()).total_seconds())
    sign, seconds = ("in ", seconds) if seconds >= 0 else ("", -seconds)
    if seconds >= 3600:
        text = f"{seconds // 3600} h {seconds % 3600 // 60} min"
    elif seconds >= 60:
        text = f"{seconds // 60} min"
    else:
        text = f"{seconds} s"
    return sign + text + ("" if sign else " ago")


def card(desktop: Desktop) -> str:
    did = _e(desktop.desktop_id)
    return f"""<article class="card">
<a class="thumb" href="/desktop/{did}">
<img loading="lazy" alt="Screen of {did}" src="/desktop/{did}/screenshot.png"></a>
<div class="body"><div class="row"><span class="mono">{did}</span></div>
<div class="row"><span class="pill">{_e(desktop.resolution)}</span>
<span class="pill">by {_e(desktop.created_by or "?")}</span>
<span class="pill">ends {_e(_age(desktop.end_at))}</span></div>
<div class="actions"><a class="button primary" href="/desktop/{did}">Open viewer</a>
<a class="button" href="/desktop/{did}?view_only=1">View only</a></div></div></article>"""


def build_router(framers: str = "") -> APIRouter:
    """``framers``: origins (space-separated) that may embed the viewer, e.g. e2b-surf's UI."""
    router = APIRouter(include_in_schema=False)

    def auth_of(request: Request) -> DesktopAuth:
        auth: DesktopAuth = request.app.state.desktop_auth
        return auth

    def ops_of(request: Request) -> DesktopOps:
        ops: DesktopOps = request.app.state.desktop_ops
        return ops

    @router.get("/")
    async def listing(request: Request) -> Response:
        if auth_of(request).browser(request) is None:
            return sign_in("/")
        try:
            desktops = await ops_of(request).live()
        except DesktopError as exc:
            return message_page("Desktops unavailable", exc.message, exc.status)
        if desktops:
            content = '<div class="grid">' + "".join(card(d) for d in desktops) + "</div>"
        else:
            content = (
                '<div class="empty">No desktops are running. Create one with '
                "<code>POST /desktops</code>, the MCP tool <code>desktop_create</code> or PMOVES' "
                "<code>/desktop/create</code>.</div>"
            )
        count = f"{len(desktops)} live desktop" + ("" if len(desktops) == 1 else "s")
        lead = f"{count}. Open one to watch and drive it in the browser." if desktops else "Nothing running yet."
        body = f"""{bar(signed_in=True)}<main class="list"><h1>Desktops</h1>
<p class="lead">{lead}</p>{content}</main>"""
        return page("Desktops · e2b-desktop", body)

    @router.post("/login")
    async def login(request: Request) -> Response:
        form = parse_qs((await request.body()).decode(errors="replace"))
        next_path = safe_next((form.get("next") or ["/"])[0])
        auth = auth_of(request)
        if not auth.token_matches((form.get("token") or [""])[0]):
            return sign_in(next_path, "That token is not right.")
        return auth.log_in(RedirectResponse(next_path, status_code=303), request)

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        return auth_of(request).log_out(RedirectResponse("/", status_code=303))

    @router.get("/desktop/{desktop_id}")
    async def viewer(desktop_id: str, request: Request) -> Response:
        auth = auth_of(request)
        link = request.query_params.get("t")
        if link is not None:
            grant = auth.link(link, desktop_id)
            if grant is None:
                return sign_in(
                    f"/desktop/{desktop_id}", "This viewer link has expired or is not valid.", framers=framers
                )
            response = RedirectResponse(f"/desktop/{quote(desktop_id)}", status_code=303)
            max_age = max(1, grant.expires - int(utcnow().timestamp()))
            set_cookie(response, request, DESKTOP_COOKIE, link, max_age, path=f"/desktop/{desktop_id}")
            return response
        grant = auth.browser(request, desktop_id)
        if grant is None:
            return sign_in(f"/desktop/{desktop_id}", framers=framers)
        try:
            desktop = await ops_of(request).get(desktop_id)
        except DesktopError as exc:
            title = "Desktop not found" if exc.status == 404 else "Desktop unavailable"
            return message_page(title, exc.message, exc.status, framers=framers)
        if not novnc_ready(request.app.state.novnc_dir):
            return message_page(
                "Viewer not installed", "noVNC's files are missing: run `make novnc`.", 503, framers=framers
            )
        view_only = grant.view_only or request.query_params.get("view_only") in ("1", "true")
        return _viewer_page(desktop, auth, grant, view_only, framers)

    @router.get("/desktop/{desktop_id}/ticket")
    async def ticket(desktop_id: str, request: Request) -> Response:
        auth = auth_of(request)
        grant = auth.browser(request, desktop_id)
        if grant is None:
            return JSONResponse({"error": "unauthorized", "detail": "sign in again"}, 401, headers=SECURITY_HEADERS)
        await ops_of(request).get(desktop_id)
        if request.query_params.get("view_only") in ("1", "true"):
            grant = Grant(grant.scope, "view", grant.expires)
        return JSONResponse({"ticket": auth.ticket(desktop_id, grant)}, headers=SECURITY_HEADERS)

    @router.get("/desktop/{desktop_id}/screenshot.png")
    async def thumbnail(desktop_id: str, request: Request) -> Response:
        if auth_of(request).browser(request, desktop_id) is None:
            return JSONResponse({"error": "unauthorized", "detail": "sign in first"}, 401)
        data = await ops_of(request).screenshot(desktop_id)
        return Response(data, media_type="image/png", headers=SECURITY_HEADERS)

    return router


def _viewer_page(desktop: Desktop, auth: DesktopAuth, grant: Grant, view_only: bool, framers: str) -> HTMLResponse:
    mode_grant = Grant(grant.scope, "view" if view_only else grant.mode, grant.expires)
    config = {
        "desktop_id": desktop.desktop_id,
        "ticket": auth.ticket(desktop.desktop_id, mode_grant),
        "ticket_url": f"/desktop/{desktop.desktop_id}/ticket" + ("?view_only=1" if view_only else ""),
        "view_only": view_only,
    }
    mode = '<span class="pill warn">view only</span>' if view_only else '<span class="pill">control</span>'
    extra = (
        f'<span class="mono">{_e(desktop.desktop_id)}</span><span class="pill">{_e(desktop.resolution)}</span>'
        f'{mode}<span id="status" class="pill">starting</span>'
    )
    tools = (
        '<button id="scale" type="button">Actual size</button>'
        '<button id="fullscreen" type="button">Full screen</button>'
    )
    # </script> cannot appear in JSON from json.dumps with these escapes.
    data = json.dumps(config).replace("<", "\\u003c")
    body = f"""<header class="bar"><a class="brand" href="/">e2b-desktop</a>{extra}
<span class="spacer"></span>{tools}</header>
<main id="screen"><div id="overlay">Connecting to the desktop…</div></main>
<script id="config" type="application/json">{data}</script>
<script type="module" src="/static/viewer.js"></script>"""
    return page(f"{desktop.desktop_id} · e2b-desktop", body, body_class="viewer", framers=framers)
