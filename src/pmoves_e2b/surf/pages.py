"""e2b-surf's web UI at ``/``: one page (``static/app.js`` renders it from the JSON API).

Signed out, the page shows a sign-in card (the surf token, exchanged for the login cookie); signed
in, the app: start a run, the sessions, and one session's live desktop (e2b-desktop's viewer in an
``<iframe>``, through a signed link from ``/api/sessions/{id}/viewer``), steps as they happen
(SSE), results to read and download. Everything is served from here (no CDN); the CSP allows
frames only from e2b-desktop's origin.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

STATIC_DIR = Path(__file__).parent / "static"
FAVICON = (
    "data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 16 16'%3E%3Crect width='16' "
    "height='16' rx='4' fill='%235aa9e6'/%3E%3C/svg%3E"
)


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def security_headers(desktop_origin: str) -> dict[str, str]:
    return {
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
        # Scripts, styles and images from here only; the one frame is e2b-desktop's viewer.
        "Content-Security-Policy": (
            "default-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
            f"frame-src {desktop_origin}; object-src 'none'; base-uri 'none'; form-action 'self'; "
            "frame-ancestors 'none'"
        ),
    }


def build_router(desktop_url: str) -> APIRouter:
    router = APIRouter(include_in_schema=False)
    desktop_origin = origin_of(desktop_url)
    headers = security_headers(desktop_origin)

    @router.get("/")
    async def index(request: Request) -> HTMLResponse:
        signed_in = request.app.state.surf_auth.session(request) is not None
        config = json.dumps({"signed_in": signed_in, "desktop_url": desktop_url}).replace("<", "\\u003c")
        document = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="dark light">
<title>e2b-surf</title><link rel="icon" href="{FAVICON}">
<link rel="stylesheet" href="/static/surf.css"></head>
<body><noscript><p class="noscript">e2b-surf's page needs JavaScript; programs use the API
(<a href="/openapi.json">/openapi.json</a>).</p></noscript>
<div id="app" data-desktop="{html.escape(desktop_origin, quote=True)}"></div>
<script id="config" type="application/json">{config}</script>
<script type="module" src="/static/app.js"></script></body></html>"""
        return HTMLResponse(document, headers=headers)

    return router
