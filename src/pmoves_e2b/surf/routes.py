"""e2b-surf's REST API and login. Errors are ``{"error": code, "detail": text}``.

Auth: ``Authorization: Bearer <E2B_SURF_AUTH_TOKEN>``, or the login cookie a browser gets from
``POST /login`` (state-changing calls with the cookie must come from the service's own origin).
Result files also open with their signed ``?sig=`` (the URLs in answers carry it).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pmoves_e2b.surf.files import ResultFiles, content_type_of
from pmoves_e2b.surf.models import SurfError, parse_request
from pmoves_e2b.surf.sessions import SessionManager
from pmoves_e2b.web_auth import Grant, TokenAuth, safe_next, same_origin

SESSION_COOKIE = "e2b_surf_session"
PURPOSE = b"pmoves-e2b surf credentials v1"
KEEPALIVE_S = 15.0
MAX_LIST = 500
NO_STORE = {"Cache-Control": "no-store"}
# desktop id -> (control URL, view-only URL) of e2b-desktop's viewer, signed; None: not configured.
ViewerLinks = Callable[[str], tuple[str, str]]


def error_response(code: str, detail: str, status: int, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    async def surf_error(_: Request, exc: Exception) -> JSONResponse:
        error = exc if isinstance(exc, SurfError) else SurfError("internal", str(exc), 500)
        return error_response(error.code, error.message, error.status)

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        status = exc.status_code if isinstance(exc, StarletteHTTPException) else 500
        headers = dict(exc.headers or {}) if isinstance(exc, StarletteHTTPException) else None
        detail = exc.detail if isinstance(exc, StarletteHTTPException) else "internal error"
        code = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed"}.get(status, "error")
        return error_response(code, str(detail), status, headers)

    app.add_exception_handler(SurfError, surf_error)
    app.add_exception_handler(StarletteHTTPException, http_error)


def unauthorized() -> SurfError:
    return SurfError("unauthorized", "send 'Authorization: Bearer <E2B_SURF_AUTH_TOKEN>' or sign in", 401)


def sse(event: dict[str, Any]) -> str:
    return f"data: {json.dumps(event, separators=(',', ':'))}\n\n"


def build_router(viewer_links: ViewerLinks | None) -> APIRouter:
    router = APIRouter()

    def manager(request: Request) -> SessionManager:
        return request.app.state.surf_sessions

    def auth_of(request: Request) -> TokenAuth:
        return request.app.state.surf_auth

    def caller(request: Request) -> str:
        """Who is calling (``api``: Bearer, ``web``: the login cookie), or 401."""
        auth = auth_of(request)
        if auth.bearer(request) is not None:
            return "api"
        grant: Grant | None = auth.session(request)
        if grant is None:
            raise unauthorized()
        if request.method not in ("GET", "HEAD") and not same_origin(request):
            raise SurfError("forbidden", "cross-origin request with the login cookie", 403)
        return "web"

    @router.post("/api/surf", status_code=202, summary="Start a surf session (runs in the background)")
    async def start(request: Request) -> JSONResponse:
        who = caller(request)
        try:
            body = json.loads(await request.body() or b"null")
        except ValueError:
            raise SurfError("invalid_request", "the body is not JSON") from None
        surf = parse_request(body)
        session = await manager(request).start(surf, who)
        headers = {"Location": f"/api/sessions/{session.session_id}"}
        return JSONResponse(session.model_dump(mode="json", exclude_none=True), 202, headers=headers)

    @router.get("/api/sessions", summary="Sessions, newest first (without steps and pages)")
    async def list_sessions(request: Request, limit: int = 100, state: str | None = None) -> JSONResponse:
        caller(request)
        if not 1 <= limit <= MAX_LIST:
            raise SurfError("invalid_request", f"limit must be 1..{MAX_LIST}")
        sessions = await manager(request).list_sessions(limit, state)
        body: dict[str, Any] = {"sessions": [s.model_dump(mode="json", exclude_none=True) for s in sessions]}
        body["running"] = manager(request).running()
        return JSONResponse(body, headers=NO_STORE)

    @router.get("/api/sessions/{session_id}", summary="One session with its steps, pages, result or error")
    async def get_session(session_id: str, request: Request) -> JSONResponse:
        caller(request)
        session = await manager(request).get(session_id)
        return JSONResponse(session.model_dump(mode="json", exclude_none=True), headers=NO_STORE)

    @router.delete("/api/sessions/{session_id}", summary="Stop the session; its desktop is killed")
    async def stop(session_id: str, request: Request) -> JSONResponse:
        caller(request)
        session = await manager(request).stop(session_id)
        return JSONResponse(session.model_dump(mode="json", exclude_none=True))

    @router.get("/api/sessions/{session_id}/events", summary="Server-Sent Events of the session")
    async def events(session_id: str, request: Request) -> StreamingResponse:
        caller(request)
        sessions = manager(request)
        await sessions.get(session_id, detail=False)  # 404 before the stream starts

        async def stream() -> AsyncIterator[str]:
            iterator = sessions.events(session_id).__aiter__()
            pending: asyncio.Task[dict[str, Any]] | None = None
            try:
                while True:
                    pending = pending or asyncio.ensure_future(iterator.__anext__())
                    done, _ = await asyncio.wait({pending}, timeout=KEEPALIVE_S)
                    if not done:
                        yield ": keep-alive\n\n"
                        continue
                    try:
                        event = pending.result()
                    except StopAsyncIteration:
                        return
                    pending = None
                    yield sse(event)
            finally:
                if pending is not None:
                    pending.cancel()
                await iterator.aclose()  # type: ignore[attr-defined]

        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    @router.get("/api/sessions/{session_id}/files/{name}", summary="A result file (Bearer, cookie or ?sig=)")
    async def result_file(session_id: str, name: str, request: Request) -> Response:
        files: ResultFiles = request.app.state.surf_files
        if files.verify(session_id, request.query_params.get("sig")) is None:
            caller(request)
        path = files.read(session_id, name)
        if path is None:
            raise SurfError("not_found", f"no file {name!r} in surf session {session_id}", 404)
        headers = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox"}
        return FileResponse(path, media_type=content_type_of(name), headers=headers)

    @router.get("/api/sessions/{session_id}/viewer", summary="Signed e2b-desktop viewer URLs of the run's desktop")
    async def viewer(session_id: str, request: Request) -> JSONResponse:
        caller(request)
        session = await manager(request).get(session_id, detail=False)
        if session.desktop_id is None or session.state not in ("queued", "running"):
            raise SurfError("no_desktop", f"surf session {session_id} has no live desktop", 409)
        if viewer_links is None:
            raise SurfError("not_configured", "E2B_DESKTOP_AUTH_TOKEN is not set: no viewer links", 503)
        control, view = viewer_links(session.desktop_id)
        return JSONResponse(
            {"desktop_id": session.desktop_id, "viewer_url": control, "view_only_url": view}, headers=NO_STORE
        )

    @router.post("/api/sessions/{session_id}/takeover", summary="A person drives the desktop; the agent waits")
    async def take_over(session_id: str, request: Request) -> JSONResponse:
        caller(request)
        manager(request).take_over(session_id, True)
        return JSONResponse({"session_id": session_id, "taken_over": True})

    @router.post("/api/sessions/{session_id}/handback", summary="Hand the desktop back to the agent")
    async def hand_back(session_id: str, request: Request) -> JSONResponse:
        caller(request)
        manager(request).take_over(session_id, False)
        return JSONResponse({"session_id": session_id, "taken_over": False})

    @router.get("/api/auth", summary="200 when the caller is signed in (Bearer or cookie), else 401")
    async def whoami(request: Request) -> JSONResponse:
        return JSONResponse({"authenticated": True, "via": caller(request)}, headers=NO_STORE)

    @router.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        """Form ``token`` (+ ``next``): the login cookie and a redirect; a wrong token is 401 JSON."""
        form = parse_qs((await request.body()).decode(errors="replace"))
        auth = auth_of(request)
        if not auth.token_matches((form.get("token") or [""])[0]):
            raise SurfError("unauthorized", "that token is not right", 401)
        target = safe_next((form.get("next") or ["/"])[0])
        return auth.log_in(RedirectResponse(target, status_code=303), request)

    @router.post("/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        return auth_of(request).log_out(RedirectResponse("/", status_code=303))

    return router
