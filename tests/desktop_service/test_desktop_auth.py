"""e2b-desktop's doors without a sandbox backend: health, 401s (page, REST, WebSocket), links, sign-in."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import websockets
from desktop_service.desktop_harness import DesktopService

from pmoves_e2b.desktop.links import Signer


def get(service: DesktopService, path: str, **kwargs: object) -> httpx.Response:
    return httpx.get(service.url + path, timeout=10, trust_env=False, follow_redirects=False, **kwargs)  # type: ignore[arg-type]


def test_health_needs_no_token_and_says_desktops_cannot_be_made(lone_desktop_service: DesktopService) -> None:
    response = get(lone_desktop_service, "/health")
    assert response.status_code == 503  # no sandbox backend: no desktops
    body = response.json()
    assert body["service"] == "e2b-desktop" and body["dependencies"]["sandbox_backend"] == "unavailable"
    assert body["dependencies"]["novnc"] == "ready"
    # Reported, and it does not decide the status: the service still serves everything else.
    assert body["dependencies"]["desktop_template"].startswith("missing (pmoves-e2b template build desktop")


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}])
def test_pages_and_rest_answer_401_without_the_token(lone_desktop_service: DesktopService, headers: dict) -> None:
    for path in ("/", "/desktop/sbx-1"):
        page = get(lone_desktop_service, path, headers=headers)
        assert page.status_code == 401 and "Sign in" in page.text, path
    api = get(lone_desktop_service, "/desktops", headers=headers)
    assert api.status_code == 401
    assert api.json()["error"] == "unauthorized" and api.headers["www-authenticate"].startswith("Bearer")


def test_rest_with_the_token_reaches_the_backend(lone_desktop_service: DesktopService) -> None:
    response = get(lone_desktop_service, "/desktops", headers=lone_desktop_service.auth)
    assert response.status_code == 503 and "e2b-sandbox" in response.json()["detail"]


async def _ws_status(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        async with websockets.connect(url, additional_headers=headers or {}, open_timeout=10) as ws:
            await ws.recv()
    except websockets.exceptions.InvalidStatus as refused:
        return refused.response.status_code
    return 101


@pytest.mark.parametrize(
    "query, headers",
    [
        ("desktop=sbx-1", None),
        ("desktop=sbx-1", {"Authorization": "Bearer wrong"}),
        ("desktop=sbx-1&ticket=123.control.sbx-1.forged", None),
    ],
)
def test_websocket_is_refused_with_401_before_any_vnc_byte(
    lone_desktop_service: DesktopService, query: str, headers: dict | None
) -> None:
    url = lone_desktop_service.url.replace("http", "ws") + "/websockify?" + query
    assert asyncio.run(_ws_status(url, headers)) == 401


def test_a_ticket_for_another_desktop_or_an_expired_one_is_refused(lone_desktop_service: DesktopService) -> None:
    signer = Signer(lone_desktop_service.token)
    other = signer.sign("ticket", "sbx-2", "control", 60)
    old = signer.sign("ticket", "sbx-1", "control", 10, now=time.time() - 120)
    base = lone_desktop_service.url.replace("http", "ws") + "/websockify?desktop=sbx-1&ticket="
    assert asyncio.run(_ws_status(base + other)) == 401
    assert asyncio.run(_ws_status(base + old)) == 401


def test_a_session_cookie_cannot_open_a_websocket_from_another_site(lone_desktop_service: DesktopService) -> None:
    session = Signer(lone_desktop_service.token).sign("session", "*", "control", 60)
    url = lone_desktop_service.url.replace("http", "ws") + "/websockify?desktop=sbx-1"
    cookie = {"Cookie": f"e2b_desktop_session={session}"}
    assert asyncio.run(_ws_status(url, {**cookie, "Origin": "http://evil.example"})) == 401
    # Same origin: past the door (the backend is down, so the desktop cannot be reached: 503).
    same = {**cookie, "Origin": lone_desktop_service.url}
    assert asyncio.run(_ws_status(url, same)) == 503


def test_expired_viewer_link_is_refused(lone_desktop_service: DesktopService) -> None:
    expired = Signer(lone_desktop_service.token).sign("link", "sbx-1", "control", 10, now=time.time() - 60)
    response = get(lone_desktop_service, f"/desktop/sbx-1?t={expired}")
    assert response.status_code == 401 and "expired" in response.text
    assert "set-cookie" not in response.headers


def test_valid_link_sets_a_desktop_cookie_and_redirects_to_the_clean_url(lone_desktop_service: DesktopService) -> None:
    link = Signer(lone_desktop_service.token).sign("link", "sbx-1", "view", 60)
    response = get(lone_desktop_service, f"/desktop/sbx-1?t={link}")
    assert response.status_code == 303 and response.headers["location"] == "/desktop/sbx-1"
    cookie = response.headers["set-cookie"]
    assert "Path=/desktop/sbx-1" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    # The cookie opens that desktop's pages only (the backend is down: 503, not 401) ...
    jar = {"e2b_desktop_grant": link}
    assert get(lone_desktop_service, "/desktop/sbx-1", cookies=jar).status_code == 503
    # ... never another desktop nor the listing.
    assert get(lone_desktop_service, "/desktop/sbx-2", cookies=jar).status_code == 401
    assert get(lone_desktop_service, "/", cookies=jar).status_code == 401


def test_sign_in_with_the_token_sets_a_session(lone_desktop_service: DesktopService) -> None:
    wrong = httpx.post(
        lone_desktop_service.url + "/login", data={"token": "nope", "next": "/"}, trust_env=False, timeout=10
    )
    assert wrong.status_code == 401 and "not right" in wrong.text
    with httpx.Client(base_url=lone_desktop_service.url, trust_env=False, timeout=10) as client:
        signed_in = client.post("/login", data={"token": lone_desktop_service.token, "next": "https://evil/"})
        assert signed_in.status_code == 303 and signed_in.headers["location"] == "/"  # no open redirect
        assert client.get("/").status_code == 503  # past the door; the backend is down
