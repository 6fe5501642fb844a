"""``WebSocket /websockify?desktop=<id>``: a viewer's VNC, relayed through e2b-sandbox's proxy.

The credential is checked before the WebSocket is accepted (401, no VNC byte flows). The
desktop's VNC is reached as noVNC's websockify inside the sandbox, through the sandbox
proxy (``sdk/config.py`` says where), never through the sandbox's network directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import websockets
from starlette.responses import JSONResponse
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.typing import Subprotocol

from pmoves_e2b.desktop import metrics
from pmoves_e2b.desktop.auth import DesktopAuth
from pmoves_e2b.desktop.desktops import DesktopError, DesktopOps
from pmoves_e2b.desktop.rfb import Reader, RfbError, ViewOnlyFilter, client_handshake, upstream_handshake

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 15
HANDSHAKE_TIMEOUT_S = 15
# Close codes for the browser (4000-4999 are the application's).
CLOSE_DESKTOP_ERROR = 4404
CLOSE_VNC_ERROR = 4502


async def deny(websocket: WebSocket, status: int, error: str, detail: str) -> None:
    """Refuse the upgrade with an HTTP answer (or a close before accept if the server cannot)."""
    response = JSONResponse({"error": error, "detail": detail}, status_code=status)
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(response)
    else:
        await websocket.close(code=4000 + status)


async def websockify(websocket: WebSocket) -> None:
    app = websocket.app
    auth: DesktopAuth = app.state.desktop_auth
    ops: DesktopOps = app.state.desktop_ops
    desktop_id = websocket.query_params.get("desktop", "")
    if not desktop_id:
        await deny(websocket, 400, "missing_desktop", "connect to /websockify?desktop=<desktop id>")
        return
    grant = auth.websocket(websocket, desktop_id)
    if grant is None:
        await deny(websocket, 401, "unauthorized", "send a Bearer token, a viewer ticket or the session cookie")
        return
    view_only = grant.view_only or websocket.query_params.get("view_only") in ("1", "true")
    try:
        target = await ops.stream(desktop_id)
    except DesktopError as exc:
        await deny(websocket, exc.status, exc.code, exc.message)
        return
    offered = websocket.scope.get("subprotocols") or []
    await websocket.accept(subprotocol="binary" if "binary" in offered else None)
    metrics.VIEWERS.inc()
    try:
        await _relay(websocket, ops, desktop_id, target.url, target.headers, target.password, view_only)
    finally:
        metrics.VIEWERS.dec()


async def _relay(
    websocket: WebSocket,
    ops: DesktopOps,
    desktop_id: str,
    url: str,
    headers: dict[str, str],
    password: str,
    view_only: bool,
) -> None:
    try:
        upstream = await asyncio.wait_for(
            websockets.connect(
                url,
                additional_headers=headers,
                subprotocols=[Subprotocol("binary")],
                max_size=None,
                open_timeout=CONNECT_TIMEOUT_S,
            ),
            CONNECT_TIMEOUT_S,
        )
    except (OSError, TimeoutError, websockets.exceptions.WebSocketException) as exc:
        ops.forget_stream(desktop_id)
        log.warning("cannot reach the desktop's VNC: %s", exc, extra={"desktop_id": desktop_id})
        await websocket.close(CLOSE_VNC_ERROR, "the desktop's VNC is not reachable; reload to try again")
        return

    async def from_browser() -> bytes:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return b""
        return message.get("bytes") or (message.get("text") or "").encode()

    async def from_desktop() -> bytes:
        data = await upstream.recv()
        return data if isinstance(data, bytes) else data.encode()

    async with upstream:
        browser, desktop = Reader(from_browser), Reader(from_desktop)
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                await upstream_handshake(desktop, upstream.send, password)
                await client_handshake(browser, websocket.send_bytes)
                await browser.read(1)  # ClientInit: always shared, so one viewer never disconnects others
                await upstream.send(b"\x01")
        except (RfbError, TimeoutError, websockets.exceptions.ConnectionClosed, WebSocketDisconnect) as exc:
            if isinstance(exc, RfbError) and "password" in str(exc):
                ops.forget_stream(desktop_id)
            with contextlib.suppress(Exception):
                await websocket.close(CLOSE_VNC_ERROR, str(exc)[:120] or "VNC handshake failed")
            return
        await _pump(websocket, upstream, browser.take(), desktop.take(), view_only)


async def _pump(
    websocket: WebSocket, upstream: websockets.ClientConnection, to_desktop: bytes, to_browser: bytes, view_only: bool
) -> None:
    drop_input = ViewOnlyFilter() if view_only else None

    async def browser_to_desktop(pending: bytes) -> None:
        while True:
            data = drop_input.feed(pending) if drop_input else pending
            if data:
                await upstream.send(data)
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            pending = message.get("bytes") or (message.get("text") or "").encode()

    async def desktop_to_browser(pending: bytes) -> None:
        if pending:
            await websocket.send_bytes(pending)
        async for data in upstream:
            await websocket.send_bytes(data if isinstance(data, bytes) else data.encode())

    tasks = [
        asyncio.ensure_future(browser_to_desktop(to_desktop)),
        asyncio.ensure_future(desktop_to_browser(to_browser)),
    ]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, RfbError):
                log.info("viewer closed: %s", result)
        with contextlib.suppress(Exception):
            await websocket.close()
