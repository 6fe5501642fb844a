"""e2b-desktop against the running stack: real desktops, the viewer in real Chromium, REST actions,
the VNC relay's doors, PMOVES' /desktop/create, the MCP desktop tools and NATS.

Screenshots of the pages land in $PMOVES_E2B_SHOTS_DIR (default /tmp/pmoves-e2b-desktop-shots).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import nats
import pytest
import websockets
from desktop_service.desktop_harness import (
    CHROMIUM,
    CHROMIUM_ARGS,
    DesktopService,
    changed_fraction,
    is_blank,
    mean_difference,
    png,
    save_shot,
)
from e2b import Sandbox
from events.nats_client import synced
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from playwright.sync_api import Page, sync_playwright

from pmoves_e2b.desktop.links import Signer
from pmoves_e2b.events import envelope

pytestmark = pytest.mark.stack

SIZE = (1024, 768)


@pytest.fixture(scope="module")
def service(running_stack: Any) -> DesktopService:
    return DesktopService(running_stack.desktop_url, running_stack.desktop_token, running_stack.env)


def api(service: DesktopService, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, service.url + path, headers=service.auth, timeout=120, trust_env=False, **kwargs)


@pytest.fixture(scope="module")
def desktop(service: DesktopService) -> Iterator[str]:
    created = api(service, "POST", "/desktops", json={"resolution": f"{SIZE[0]}x{SIZE[1]}", "duration": 900})
    assert created.status_code == 201, created.text
    desktop_id = created.json()["desktop_id"]
    yield desktop_id
    api(service, "DELETE", f"/desktops/{desktop_id}")


def screenshot(service: DesktopService, desktop_id: str) -> Any:
    response = api(service, "GET", f"/desktops/{desktop_id}/screenshot")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png", response.text
    return png(response.content)


def act(service: DesktopService, desktop_id: str, *actions: dict[str, Any]) -> dict[str, Any]:
    response = api(service, "POST", f"/desktops/{desktop_id}/actions", json={"actions": list(actions)})
    assert response.status_code == 200, response.text
    return response.json()


def wait_for_change(service: DesktopService, desktop_id: str, before: Any, timeout: float = 15) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        after = screenshot(service, desktop_id)
        if changed_fraction(before, after) > 0.005 or time.monotonic() > deadline:
            return after
        time.sleep(0.5)


def test_rest_desktop_is_listed_and_has_a_screen_of_the_asked_size(service: DesktopService, desktop: str) -> None:
    listed = api(service, "GET", "/desktops").json()["desktops"]
    assert desktop in [d["desktop_id"] for d in listed]
    info = api(service, "GET", f"/desktops/{desktop}").json()
    assert info["resolution"] == "1024x768" and info["viewer_url"].endswith(f"/desktop/{desktop}")
    shot = screenshot(service, desktop)
    assert shot.size == SIZE and not is_blank(shot)


def test_rest_actions_move_the_pointer_and_change_the_screen(service: DesktopService, desktop: str) -> None:
    moved = act(service, desktop, {"type": "move", "x": 400, "y": 300})
    assert moved["cursor"] == {"x": 400, "y": 300}
    before = screenshot(service, desktop)
    # A right click on the desktop background opens xfdesktop's menu.
    act(service, desktop, {"type": "click", "x": 600, "y": 400, "button": "right"}, {"type": "wait", "ms": 500})
    after = wait_for_change(service, desktop, before)
    save_shot("rest-after-right-click.png", _png_bytes(after))
    assert changed_fraction(before, after) > 0.005
    closed = act(service, desktop, {"type": "key", "keys": "escape"}, {"type": "wait", "ms": 300})
    assert closed["done"] == ["key", "wait"]


def _sandbox(running_stack: Any, desktop: str) -> Sandbox:
    return Sandbox.connect(
        desktop, api_key=running_stack.api_key, api_url=running_stack.sandbox_url, sandbox_url=running_stack.sandbox_url
    )


def _edit(service: DesktopService, desktop: str, sandbox: Sandbox) -> str:
    """A new empty file opened in mousepad over REST; its path once the editor has the focus."""
    path = f"/home/user/note-{uuid.uuid4().hex[:8]}.txt"
    sandbox.files.write(path, "")
    act(service, desktop, {"type": "launch", "app": "org.xfce.mousepad", "uri": path})
    # Type only once the editor's window is mapped and focused (the machine may be slow).
    deadline = time.monotonic() + 30
    while True:
        focused = sandbox.commands.run(
            "xdotool getwindowfocus getwindowname || true", envs={"DISPLAY": ":0"}, timeout=10
        ).stdout
        if Path(path).name in focused or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert Path(path).name in focused, focused
    time.sleep(1.5)  # mousepad maps and drops helper windows right after it takes the focus
    return path


def test_rest_typed_text_lands_in_the_editor(running_stack: Any, service: DesktopService, desktop: str) -> None:
    text = "héllo wörld — typed over REST"
    sandbox = _sandbox(running_stack, desktop)
    path = _edit(service, desktop, sandbox)
    act(
        service,
        desktop,
        {"type": "type", "text": text},
        {"type": "key", "keys": "ctrl+s"},
        {"type": "wait", "ms": 1000},
        {"type": "key", "keys": "ctrl+q"},
    )
    assert sandbox.files.read(path).rstrip("\n") == text


def test_rest_typed_unicode_is_exact_while_the_desktop_is_busy(
    running_stack: Any, service: DesktopService, desktop: str
) -> None:
    """Characters outside the keymap reach an app that reads its keys late (xdotool alone, binding
    each for its press only, lost about one line in two here), more of them than there are spare keycodes."""
    text = "Grüße aus Köln — naïve café, señor; Ελληνικά λέξεις; Привет, мир; ∑ → ≠ € ½ ©"
    assert len({c for c in text if ord(c) >= 0xA0}) > 30  # more than the ~18 empty keycodes of Xvfb's map
    sandbox = _sandbox(running_stack, desktop)
    path = _edit(service, desktop, sandbox)
    busy = sandbox.commands.run("for i in 1 2 3; do (while :; do :; done) & done; wait", background=True, timeout=0)
    try:
        act(service, desktop, {"type": "type", "text": text}, {"type": "key", "keys": "ctrl+s"})
        deadline = time.monotonic() + 30
        while (saved := sandbox.files.read(path).rstrip("\n")) != text and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        busy.kill()
        sandbox.commands.run("pkill -f '[f]or i in 1 2 3; do'; true", timeout=10)
    act(service, desktop, {"type": "key", "keys": "ctrl+q"})
    assert saved == text


def test_rest_actions_answer_while_windows_open_and_close_under_the_pointer(
    running_stack: Any, service: DesktopService, desktop: str
) -> None:
    """An app that quits under the pointer (ctrl+q as a batch's last action) must not turn the
    batch into a 409: the pointer query after the actions looks up the window under the pointer."""
    sandbox = _sandbox(running_stack, desktop)
    # Screen-sized windows come and go under the pointer, tens of milliseconds each.
    churn = sandbox.commands.run(
        "while :; do xmessage -geometry 1024x768+0+0 churn & p=$!; sleep 0.0$((RANDOM % 6)); kill $p; done",
        background=True,
        envs={"DISPLAY": ":0"},
        timeout=0,
    )
    try:
        for n in range(40):
            answer = act(service, desktop, {"type": "move", "x": 500 + n % 2, "y": 400})
            assert answer["cursor"] == {"x": 500 + n % 2, "y": 400}
    finally:
        churn.kill()
        sandbox.commands.run("pkill -x xmessage; true", timeout=10)


def test_rest_errors_are_clear_json(service: DesktopService, desktop: str) -> None:
    outside = api(service, "POST", f"/desktops/{desktop}/actions", json={"type": "move", "x": 5000, "y": 1})
    assert outside.status_code == 422 and "outside the 1024x768 screen" in outside.json()["detail"]
    bad_key = api(service, "POST", f"/desktops/{desktop}/actions", json={"type": "key", "keys": "ENTERR"})
    assert bad_key.status_code == 422 and "unknown key" in bad_key.json()["detail"]
    too_long = api(service, "POST", "/desktops", json={"duration": 10**7})
    assert too_long.status_code == 422 and "E2B_DESKTOP_MAX_DURATION" in too_long.json()["detail"]
    for method, path in [("GET", "/desktops/nope"), ("GET", "/desktops/nope/screenshot"), ("DELETE", "/desktops/nope")]:
        gone = api(service, method, path)
        assert gone.status_code == 404 and gone.json()["error"] == "not_found", (path, gone.text)


def _png_bytes(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _open_viewer(page: Page, url: str) -> None:
    page.goto(url)
    # Polled from here: the pages' CSP (no eval) stops Playwright's in-page wait_for_function.
    deadline = time.monotonic() + 60
    while not page.evaluate("Boolean(window.viewerState && window.viewerState.connected)"):
        assert time.monotonic() < deadline, page.evaluate("JSON.stringify(window.viewerState || null)")
        page.wait_for_timeout(200)
    page.wait_for_timeout(1500)  # the first full frame


def _canvas(page: Page) -> Any:
    return png(page.locator("#screen canvas").screenshot())


def test_viewer_in_chromium_shows_the_live_desktop(service: DesktopService, desktop: str) -> None:
    link = Signer(service.token).sign("link", desktop, "control", 120)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            _open_viewer(page, f"{service.url}/desktop/{desktop}?t={link}")
            assert page.url == f"{service.url}/desktop/{desktop}"  # the credential left the address bar
            save_shot("viewer.png", page.screenshot())
            canvas = _canvas(page)
            assert not is_blank(canvas)
            # The canvas shows what the desktop shows (scaled to the window).
            assert mean_difference(canvas, screenshot(service, desktop)) < 25
            # Live: a change made over REST appears in the open viewer.
            before = _canvas(page)
            act(service, desktop, {"type": "click", "x": 500, "y": 380, "button": "right"}, {"type": "wait", "ms": 700})
            page.wait_for_timeout(1000)
            after = _canvas(page)
            save_shot("viewer-after-right-click.png", page.screenshot())
            act(service, desktop, {"type": "key", "keys": "escape"})
            assert changed_fraction(before, after) > 0.003
            # The listing needs the token (a link opens one desktop only); then it links to the desktop.
            listing = page.goto(service.url + "/")
            assert listing is not None and listing.status == 401
            save_shot("sign-in.png", page.screenshot())
            page.fill("input[name=token]", service.token)
            page.click("button[type=submit]")
            page.wait_for_url(service.url + "/")
            assert page.locator(f'a[href="/desktop/{desktop}"]').count() >= 1
            page.wait_for_timeout(1500)
            save_shot("listing.png", page.screenshot())
        finally:
            browser.close()


def test_viewer_pages_refuse_no_token_and_expired_links_on_a_real_desktop(
    service: DesktopService, desktop: str
) -> None:
    assert httpx.get(f"{service.url}/desktop/{desktop}", trust_env=False).status_code == 401
    expired = Signer(service.token).sign("link", desktop, "control", 5, now=time.time() - 30)
    refused = httpx.get(f"{service.url}/desktop/{desktop}?t={expired}", trust_env=False)
    assert refused.status_code == 401 and "expired" in refused.text
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            response = page.goto(f"{service.url}/desktop/{desktop}?t={expired}")
            assert response is not None and response.status == 401
            save_shot("expired-link.png", page.screenshot())
        finally:
            browser.close()


async def _rfb_session(url: str, headers: dict[str, str] | None = None) -> websockets.ClientConnection:
    """Connect like a VNC viewer through the relay: version, security none, ClientInit, ServerInit."""
    ws = await websockets.connect(url, additional_headers=headers or {}, subprotocols=["binary"], max_size=None)
    buffer = bytearray()

    async def read(n: int) -> bytes:
        while len(buffer) < n:
            buffer.extend(await asyncio.wait_for(ws.recv(), 30))
        data = bytes(buffer[:n])
        del buffer[:n]
        return data

    assert await read(12) == b"RFB 003.008\n"
    await ws.send(b"RFB 003.008\n")
    assert await read(2) == bytes([1, 1])  # one type offered: none (the relay did the VNC password)
    await ws.send(bytes([1]))
    assert await read(4) == b"\0\0\0\0"
    await ws.send(bytes([1]))
    width, height = struct.unpack(">HH", await read(4))
    assert (width, height) == SIZE
    return ws


def test_websocket_relays_vnc_and_view_only_drops_input(service: DesktopService, desktop: str) -> None:
    base = service.url.replace("http", "ws") + f"/websockify?desktop={desktop}"
    signer = Signer(service.token)

    async def pointer(ticket_mode: str, x: int, y: int) -> None:
        ws = await _rfb_session(base + "&ticket=" + signer.sign("ticket", desktop, ticket_mode, 60))  # type: ignore[arg-type]
        try:
            await ws.send(bytes([5, 0]) + struct.pack(">HH", x, y))
            await asyncio.sleep(1.0)
        finally:
            await ws.close()

    act(service, desktop, {"type": "move", "x": 10, "y": 10})
    asyncio.run(pointer("view", 700, 500))
    assert act(service, desktop, {"type": "wait", "ms": 0})["cursor"] == {"x": 10, "y": 10}
    asyncio.run(pointer("control", 700, 500))
    assert act(service, desktop, {"type": "wait", "ms": 0})["cursor"] == {"x": 700, "y": 500}

    async def as_program() -> None:  # programs use the bearer header
        ws = await _rfb_session(base, service.auth)
        await ws.close()

    asyncio.run(as_program())

    async def refused(headers: dict[str, str]) -> int:
        try:
            await websockets.connect(base, additional_headers=headers)
        except websockets.exceptions.InvalidStatus as exc:
            return exc.response.status_code
        return 101

    assert asyncio.run(refused({"Authorization": "Bearer wrong"})) == 401
    assert asyncio.run(refused({})) == 401


def test_the_desktops_vnc_is_not_open_to_whoever_knows_its_id(running_stack: Any, desktop: str) -> None:
    """Straight to the sandbox proxy, without the relay: no traffic token, no stream."""
    url = running_stack.sandbox_url.replace("http", "ws") + "/websockify"
    headers = {"E2b-Sandbox-Id": desktop, "E2b-Sandbox-Port": "6080"}

    async def status() -> int:
        try:
            async with websockets.connect(url, additional_headers=headers, subprotocols=["binary"]) as ws:
                await ws.recv()
        except websockets.exceptions.InvalidStatus as exc:
            return exc.response.status_code
        return 101

    assert asyncio.run(status()) == 403


def test_viewers_reconnect_after_e2b_desktop_restarts(
    running_stack: Any, service: DesktopService, desktop: str
) -> None:
    base = service.url.replace("http", "ws") + f"/websockify?desktop={desktop}"

    async def view() -> None:
        ws = await _rfb_session(base, service.auth)
        await ws.close()

    asyncio.run(view())  # the stream runs, started by this e2b-desktop process
    old = running_stack.service_pid("desktop")
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while running_stack.service_pid("desktop") in (None, old):
        assert time.monotonic() < deadline, "e2b-desktop was not restarted"
        time.sleep(0.2)
    running_stack.wait_healthy("desktop", timeout=60)
    # The new process does not know the stream's password: it restarts the stream.
    asyncio.run(view())
    assert screenshot(service, desktop).size == SIZE


def test_pmoves_desktop_create_with_its_exact_payload(running_stack: Any, service: DesktopService) -> None:
    response = httpx.post(
        running_stack.mcp_url + "/desktop/create",
        json={"duration": 3600, "memory_mb": 2048, "resolution": "1920x1080"},
        headers={"Content-Type": "application/json", "X-E2B-API-Key": running_stack.api_key},
        timeout=60,
        trust_env=False,
    )
    assert response.status_code < 400, response.text
    data = response.json()["data"]
    desktop_id = data["desktop_id"]
    try:
        # What PMOVES builds from it: E2B_DESKTOP_URL + "/desktop/" + desktop_id.
        # (E2B_DESKTOP_URL is not set in the test stack: its default is http://localhost:<E2B_DESKTOP_PORT>.)
        assert data["novnc_url"] == f"http://localhost:{running_stack.ports['desktop']}/desktop/{desktop_id}"
        opened = httpx.get(data["viewer_url"], trust_env=False, follow_redirects=True, timeout=30)
        assert opened.status_code == 200 and desktop_id in opened.text
        assert screenshot(service, desktop_id).size == (1920, 1080)
    finally:
        api(service, "DELETE", f"/desktops/{desktop_id}")


def test_mcp_desktop_tools_with_the_official_client(running_stack: Any, service: DesktopService) -> None:
    async def scenario() -> None:
        headers = {"Authorization": f"Bearer {running_stack.mcp_token}"}
        async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=180)) as http:
            async with Client(streamable_http_client(running_stack.mcp_url + "/mcp", http_client=http)) as client:
                created = await client.call_tool("desktop_create", {"resolution": "1024x768", "timeout_seconds": 600})
                assert not created.is_error, created.content
                desktop_id = created.structured_content["desktop_id"]
                try:
                    shot = await client.call_tool("desktop_screenshot", {"desktop_id": desktop_id})
                    images = [item for item in shot.content if item.type == "image"]
                    assert images and images[0].mime_type == "image/png"
                    assert png(base64.b64decode(images[0].data)).size == SIZE
                    clicked = await client.call_tool("desktop_click", {"desktop_id": desktop_id, "x": 300, "y": 200})
                    assert clicked.structured_content["cursor"] == {"x": 300, "y": 200}
                    for tool, args in [
                        ("desktop_type", {"text": "héllo"}),
                        ("desktop_key", {"keys": "escape"}),
                        ("desktop_scroll", {"direction": "down", "amount": 2}),
                    ]:
                        result = await client.call_tool(tool, {"desktop_id": desktop_id, **args})
                        assert not result.is_error, (tool, result.content)
                    bad = await client.call_tool("desktop_key", {"desktop_id": desktop_id, "keys": "ENTERR"})
                    assert bad.is_error and "unknown key" in bad.content[0].text
                finally:
                    killed = await client.call_tool("desktop_kill", {"desktop_id": desktop_id})
                    assert not killed.is_error
                gone = await client.call_tool("desktop_screenshot", {"desktop_id": desktop_id})
                assert gone.is_error and "not found" in gone.content[0].text

    anyio.run(scenario)


def test_nats_request_gets_ready_then_completed(running_stack: Any, service: DesktopService) -> None:
    request_id = uuid.uuid4().hex

    async def scenario() -> tuple[envelope.Envelope, envelope.Envelope]:
        client = await nats.connect(running_stack.nats_url)
        try:
            ended: asyncio.Queue[envelope.Envelope] = asyncio.Queue()

            async def on_end(msg: Any) -> None:
                event = envelope.parse(msg.data, msg.subject)
                if event.correlation_id == request_id:
                    await ended.put(event)

            await client.subscribe("e2b.desktop.completed.v1", cb=on_end)
            # PMOVES' flat request (no envelope).
            flat = {"request_id": request_id, "agent_id": "tests", "duration": 600, "resolution": "1024x768"}
            reply = await client.request("e2b.desktop.request.v1", envelope_bytes(flat), timeout=120)
            ready = envelope.parse(reply.data, "reply")
            assert ready.topic == "e2b.desktop.ready.v1", ready
            killed = api(service, "DELETE", f"/desktops/{ready.payload['desktop_id']}")
            assert killed.status_code == 204
            return ready, await asyncio.wait_for(ended.get(), 30)
        finally:
            await client.close()

    ready, completed = anyio.run(scenario)
    desktop_url = f"http://localhost:{running_stack.ports['desktop']}/desktop/"
    assert ready.correlation_id == request_id and ready.payload["viewer_url"].startswith(desktop_url)
    assert completed.payload["desktop_id"] == ready.payload["desktop_id"] and completed.payload["reason"] == "killed"


def test_lifecycle_events_and_metrics(running_stack: Any, service: DesktopService) -> None:
    def metric(name: str) -> float:
        text = httpx.get(service.url + "/metrics", trust_env=False, timeout=10).text
        values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
        return values[0] if values else 0.0

    async def scenario() -> tuple[str, dict[str, envelope.Envelope], float]:
        client = await nats.connect(running_stack.nats_url)
        try:
            events: list[tuple[str, envelope.Envelope]] = []

            async def on_event(msg: Any) -> None:
                events.append((msg.subject, envelope.parse(msg.data, msg.subject)))

            def of(desktop_id: str) -> dict[str, envelope.Envelope]:
                return {subject: e for subject, e in events if e.payload.get("desktop_id") == desktop_id}

            await client.subscribe("e2b.desktop.*.v1", cb=on_event)
            await synced(client)
            created = await anyio.to_thread.run_sync(
                lambda: api(service, "POST", "/desktops", json={"resolution": "800x600", "duration": 300})
            )
            desktop_id = created.json()["desktop_id"]
            active = metric("e2b_desktops_active")
            await anyio.to_thread.run_sync(lambda: api(service, "DELETE", f"/desktops/{desktop_id}"))
            deadline = time.monotonic() + 30
            while "e2b.desktop.killed.v1" not in of(desktop_id) and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            return desktop_id, of(desktop_id), active
        finally:
            await client.close()

    desktop_id, seen, active = anyio.run(scenario)
    assert set(seen) >= {"e2b.desktop.created.v1", "e2b.desktop.killed.v1"}, seen
    assert seen["e2b.desktop.created.v1"].payload["resolution"] == "800x600"
    assert seen["e2b.desktop.created.v1"].source == "e2b-desktop"
    assert active >= 1 and metric("e2b_desktop_create_seconds_count") >= 1


def test_nats_request_that_cannot_be_served_gets_failed(running_stack: Any) -> None:
    async def scenario() -> envelope.Envelope:
        client = await nats.connect(running_stack.nats_url)
        try:
            flat = {"request_id": "too-small", "resolution": "10x10"}
            reply = await client.request("e2b.desktop.request.v1", envelope_bytes(flat), timeout=60)
            return envelope.parse(reply.data, "reply")
        finally:
            await client.close()

    failed = anyio.run(scenario)
    assert failed.topic == "e2b.desktop.failed.v1" and failed.correlation_id == "too-small"
    assert failed.payload["code"] == "invalid_resolution" and "320x200" in failed.payload["reason"]


def envelope_bytes(flat: dict[str, Any]) -> bytes:
    return json.dumps(flat).encode()


def test_a_desktop_whose_display_dies_is_reported_failed(running_stack: Any, service: DesktopService) -> None:
    created = api(service, "POST", "/desktops", json={"resolution": "800x600", "duration": 600})
    assert created.status_code == 201, created.text
    desktop_id = created.json()["desktop_id"]

    async def scenario() -> envelope.Envelope:
        client = await nats.connect(running_stack.nats_url)
        try:
            failed: asyncio.Queue[envelope.Envelope] = asyncio.Queue()

            async def on_failed(msg: Any) -> None:
                event = envelope.parse(msg.data, msg.subject)
                if event.payload.get("desktop_id") == desktop_id:
                    await failed.put(event)

            await client.subscribe("e2b.desktop.failed.v1", cb=on_failed)
            await synced(client)
            sandbox = await anyio.to_thread.run_sync(
                lambda: Sandbox.connect(
                    desktop_id,
                    api_key=running_stack.api_key,
                    api_url=running_stack.sandbox_url,
                    sandbox_url=running_stack.sandbox_url,
                )
            )
            await anyio.to_thread.run_sync(lambda: sandbox.commands.run("pkill -KILL -x Xvfb || true", user="root"))
            return await asyncio.wait_for(failed.get(), 60)
        finally:
            await client.close()

    event = anyio.run(scenario)
    assert event.payload["code"] == "desktop_crashed" and "Xvfb" in event.payload["reason"]
    deadline = time.monotonic() + 30
    while api(service, "GET", f"/desktops/{desktop_id}").status_code != 404:
        assert time.monotonic() < deadline, "the crashed desktop is still listed"
        time.sleep(1)
