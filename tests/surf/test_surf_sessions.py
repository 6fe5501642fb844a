"""e2b-surf sessions on the real stack: the API's errors, the concurrency cap, DELETE, restart."""

from __future__ import annotations

import os
import signal
import time
from urllib.parse import urlsplit

import httpx
import pytest
from stack.harness import RunningStack
from surf.surf_harness import SURF_CONCURRENT, SurfClient
from surf.surf_site import Site

pytestmark = pytest.mark.stack


def sandbox_exists(stack: RunningStack, sandbox_id: str) -> bool:
    response = httpx.get(
        f"{stack.sandbox_url}/sandboxes/{sandbox_id}", headers={"X-API-Key": stack.api_key}, timeout=30
    )
    assert response.status_code in (200, 404), response.text
    return response.status_code == 200 and response.json().get("state") != "killed"


def wait_gone(stack: RunningStack, sandbox_id: str, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while sandbox_exists(stack, sandbox_id):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"url": "http://198.51.100.80/", "colour": "red"}, "colour: unknown field"),
        ({"url": "ftp://198.51.100.80/"}, "url: "),
        ({"url": "http://198.51.100.80/", "depth": "2"}, "depth: "),
        ({"url": "http://198.51.100.80/", "max_pages": 0}, "max_pages: "),
        ({"url": "http://198.51.100.80/", "task": "do it"}, "task: not an option of mode 'scrape'"),
        ({"url": "http://198.51.100.80/", "mode": "agent", "task": "x", "depth": 2}, "depth: not an option of mode"),
        ({"url": "http://198.51.100.80/", "mode": "agent"}, "needs a task"),
        ({"url": "http://198.51.100.80/", "formats": ["pdf"]}, "formats.0"),
        ({"url": "http://198.51.100.80/", "timeout": 100000}, "exceeds E2B_SURF_TIMEOUT"),
        (["http://198.51.100.80/"], "JSON object"),
    ],
)
def test_a_bad_request_is_a_400_naming_the_problem(surf: SurfClient, body: object, fragment: str) -> None:
    response = surf.http.post("/api/surf", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_request"
    assert fragment in response.json()["detail"]


def test_errors_are_json_and_credentials_are_needed(surf: SurfClient) -> None:
    assert (
        surf.http.post("/api/surf", content=b"{nope", headers={"Content-Type": "application/json"}).status_code == 400
    )
    missing = surf.http.get("/api/sessions/surf_0000000000000000")
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    anonymous = httpx.get(surf.stack.surf_url + "/api/sessions", timeout=30)
    assert anonymous.status_code == 401 and anonymous.json()["error"] == "unauthorized"
    wrong = httpx.get(surf.stack.surf_url + "/api/sessions", headers={"Authorization": "Bearer nope"}, timeout=30)
    assert wrong.status_code == 401


def test_a_browser_logs_in_for_a_cookie(surf: SurfClient) -> None:
    with httpx.Client(base_url=surf.stack.surf_url, timeout=30, trust_env=False) as browser:
        assert browser.post("/login", data={"token": "wrong"}).status_code == 401
        assert browser.get("/api/auth").status_code == 401
        login = browser.post("/login", data={"token": surf.stack.surf_token, "next": "https://evil.example/"})
        assert login.status_code == 303 and login.headers["location"] == "/"
        cookie = login.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert browser.get("/api/auth").json() == {"authenticated": True, "via": "web"}
        # The cookie does not let another site make the browser start runs.
        evil = browser.post(
            "/api/surf", json={"url": "http://198.51.100.80/"}, headers={"Origin": "http://evil.example"}
        )
        assert evil.status_code == 403
        browser.post("/logout")
        assert browser.get("/api/auth").status_code == 401


def test_the_cap_gives_429_and_delete_stops_a_run_and_kills_its_desktop(surf: SurfClient, site: Site) -> None:
    slow = {"url": site.url("/slow"), "formats": ["text"]}
    sessions = [surf.start(**slow) for _ in range(SURF_CONCURRENT)]
    try:
        running = [surf.wait(s["session_id"], ("running",) + ("failed",)) for s in sessions]
        assert [s["state"] for s in running] == ["running"] * SURF_CONCURRENT, running
        over = surf.http.post("/api/surf", json=slow)
        assert over.status_code == 429 and over.json()["error"] == "too_many_sessions"

        first = running[0]
        desktop_id = first["desktop_id"]
        assert sandbox_exists(surf.stack, desktop_id)

        # The run's desktop can be watched: a signed e2b-desktop viewer link that opens without a token.
        viewer = surf.http.get(f"/api/sessions/{first['session_id']}/viewer").json()
        assert viewer["desktop_id"] == desktop_id
        link = urlsplit(viewer["viewer_url"])
        assert link.port == surf.stack.ports["desktop"] and link.path == f"/desktop/{desktop_id}"
        assert link.query.startswith("t=")
        with httpx.Client(timeout=30, trust_env=False, follow_redirects=True) as browser:
            opened = browser.get(viewer["viewer_url"])
            assert opened.status_code == 200 and str(opened.url).endswith(f"/desktop/{desktop_id}")

        # A person takes over and hands back (the flag an agent loop waits on).
        path = f"/api/sessions/{first['session_id']}"
        assert surf.http.post(path + "/takeover").json()["taken_over"] is True
        assert surf.get(first["session_id"])["taken_over"] is True
        assert surf.http.post(path + "/handback").json()["taken_over"] is False
        assert surf.get(first["session_id"])["taken_over"] is False
        stopped = surf.http.delete(f"/api/sessions/{first['session_id']}")
        assert stopped.status_code == 200 and stopped.json()["state"] == "stopped"
        assert stopped.json()["error"]["code"] == "stopped"
        assert not sandbox_exists(surf.stack, desktop_id), "DELETE answered while the desktop still runs"

        # The freed slot takes a new run.
        sessions.append(surf.start(**slow))
    finally:
        for session in sessions:
            surf.http.delete(f"/api/sessions/{session['session_id']}")
    events = surf.events(first["session_id"])
    states = [(e["state"], e.get("taken_over")) for e in events if e["type"] == "state"]
    assert states == [("queued", None), ("running", None), ("running", True), ("running", False), ("stopped", None)]
    assert surf.http.post(f"/api/sessions/{first['session_id']}/takeover").status_code == 409
    assert surf.http.get(f"/api/sessions/{first['session_id']}/viewer").status_code == 409


def surf_desktops(stack: RunningStack, session_id: str) -> list[str]:
    """Live sandboxes made for that surf session (by their metadata)."""
    response = httpx.get(f"{stack.sandbox_url}/sandboxes", headers={"X-API-Key": stack.api_key}, timeout=30)
    assert response.status_code == 200, response.text
    return [s["sandboxID"] for s in response.json() if (s.get("metadata") or {}).get("surf_session") == session_id]


def test_a_run_stopped_while_its_desktop_is_being_made_leaves_no_desktop(surf: SurfClient, site: Site) -> None:
    started = time.monotonic()
    session = surf.start(url=site.url("/slow"), formats=["text"])
    stopped = surf.http.delete(f"/api/sessions/{session['session_id']}")
    assert stopped.status_code == 200 and stopped.json()["state"] == "stopped"
    # The desktop the SDK was making is removed once made (before the fix it lived out its duration).
    while time.monotonic() - started < 25 or surf_desktops(surf.stack, session["session_id"]):
        assert time.monotonic() - started < 60, "the stopped run's desktop is still running"
        time.sleep(0.5)


def test_a_restart_of_e2b_surf_lists_its_runs_as_interrupted(surf: SurfClient, site: Site) -> None:
    stack = surf.stack
    session = surf.start(url=site.url("/slow"), formats=["text"])
    running = surf.wait(session["session_id"], ("running", "failed"))
    assert running["state"] == "running"
    old_pid = stack.service_pid("surf")
    assert old_pid is not None
    os.kill(old_pid, signal.SIGKILL)
    deadline = time.monotonic() + 90
    while stack.service_pid("surf") in (None, old_pid):
        assert time.monotonic() < deadline, "e2b-surf was not restarted"
        time.sleep(0.5)
    stack.wait_healthy("surf", timeout=90)

    after = surf.get(session["session_id"])
    assert after["state"] == "interrupted"
    assert after["error"]["code"] == "interrupted"
    listed = surf.http.get("/api/sessions").json()["sessions"]
    assert session["session_id"] in [s["session_id"] for s in listed]
    assert wait_gone(stack, running["desktop_id"]), "the interrupted run's desktop was left running"
