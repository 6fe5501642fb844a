"""Warm desktops (``E2B_SURF_WARM_DESKTOPS``) on a stack of their own: a session claims the
desktop made before it (Chromium already attached), gets its page from it, and another warm
desktop is made behind it; the claimed one goes with its session. Run under the fake-internet lock."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from stack.harness import RunningStack, started_stack
from surf.surf_harness import SurfClient
from surf.surf_site import Site

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def warm_stack() -> Iterator[RunningStack]:
    with started_stack({"E2B_SURF_WARM_DESKTOPS": "1", "E2B_SURF_TIMEOUT": "120"}) as stack:
        yield stack


def surf_desktops(stack: RunningStack) -> dict[str, str]:
    """Live sandboxes made by e2b-surf: id -> its surf_session metadata."""
    response = httpx.get(f"{stack.sandbox_url}/sandboxes", headers={"X-API-Key": stack.api_key}, timeout=30)
    assert response.status_code == 200, response.text
    return {
        s["sandboxID"]: s["metadata"]["surf_session"]
        for s in response.json()
        if "surf_session" in (s.get("metadata") or {})
    }


def warm_ready(stack: RunningStack, timeout: float = 120) -> None:
    """Until e2b-surf reports a warm desktop ready (made and its browser attached)."""
    deadline = time.monotonic() + timeout
    while "e2b_surf_warm_desktops 1.0" not in httpx.get(f"{stack.surf_url}/metrics", timeout=10).text:
        assert time.monotonic() < deadline, "no warm desktop got ready"
        time.sleep(0.3)


def warm_desktop(stack: RunningStack, other_than: str | None = None, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while True:
        warm = [d for d, owner in surf_desktops(stack).items() if owner == "warm" and d != other_than]
        if warm:
            return warm[0]
        assert time.monotonic() < deadline, "no warm desktop was made"
        time.sleep(0.5)


def test_a_session_claims_the_warm_desktop_and_another_is_made(warm_stack: RunningStack, site: Site) -> None:
    surf = SurfClient(warm_stack)
    try:
        warm_ready(warm_stack)
        ready = warm_desktop(warm_stack)
        session = surf.wait(surf.start(url=site.url("/"), formats=["markdown", "links"])["session_id"])
        assert session["state"] == "completed", session.get("error")
        assert session["desktop_id"] == ready
        [page] = session["pages"]
        assert "HOME-ARTICLE paragraph 1." in page["data"]["markdown"]
        following = warm_desktop(warm_stack, other_than=ready)
        deadline = time.monotonic() + 30
        while ready in surf_desktops(warm_stack):  # the claimed desktop went with its session
            assert time.monotonic() < deadline, "the used warm desktop was not removed"
            time.sleep(0.5)
        assert following in surf_desktops(warm_stack)
    finally:
        surf.close()
