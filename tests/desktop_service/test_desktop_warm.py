"""Desktops booted ahead (``E2B_DESKTOP_WARM``, template ``desktop-warm``) on a stack of their own:
e2b-sandbox's warm pool keeps one booted (X and XFCE up and drawn at 1920x1080), no desktop
listing shows it, a default-resolution create claims it (its first screenshot is the drawn
desktop) and another is booted behind it; another resolution is booted as usual; a claimed
desktop goes like any other."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from desktop_service.desktop_harness import png
from stack.harness import RunningStack, started_stack

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def warm_stack() -> Iterator[RunningStack]:
    with started_stack({"E2B_DESKTOP_WARM": "1"}) as stack:
        yield stack


def pool_ready(stack: RunningStack, template: str = "desktop-warm") -> float:
    text = httpx.get(f"{stack.sandbox_url}/metrics", timeout=10, trust_env=False).text
    found = re.search(rf'^e2b_sandbox_pool_ready{{template="{template}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def wait_pool_ready(stack: RunningStack, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while pool_ready(stack) < 1:
        assert time.monotonic() < deadline, "no desktop-warm sandbox got ready"
        time.sleep(0.3)


def sandboxes(stack: RunningStack) -> dict[str, dict[str, Any]]:
    response = httpx.get(f"{stack.sandbox_url}/sandboxes", headers={"X-API-Key": stack.api_key}, timeout=30)
    assert response.status_code == 200, response.text
    return {s["sandboxID"]: s for s in response.json()}


def dark_share(image: Any) -> float:
    histogram = image.convert("L").histogram()
    return sum(histogram[:12]) / (image.width * image.height)


def test_a_default_desktop_claims_a_booted_one_and_another_boots_behind(warm_stack: RunningStack) -> None:
    auth = {"Authorization": f"Bearer {warm_stack.desktop_token}"}
    with httpx.Client(base_url=warm_stack.desktop_url, headers=auth, timeout=120, trust_env=False) as api:
        wait_pool_ready(warm_stack)
        # Waiting in the pool, it is nobody's desktop: no listing shows it.
        assert api.get("/desktops").json()["desktops"] == []
        assert sandboxes(warm_stack) == {}

        created = api.post("/desktops", json={"duration": 300})
        assert created.status_code == 201, created.text
        desktop_id = created.json()["desktop_id"]
        try:
            assert created.json()["resolution"] == "1920x1080"
            assert sandboxes(warm_stack)[desktop_id]["templateID"] == "desktop-warm"
            metrics = httpx.get(f"{warm_stack.sandbox_url}/metrics", timeout=10, trust_env=False).text
            assert 'e2b_sandbox_pool_hits_total{template="desktop-warm"} 1.0' in metrics
            shot = png(api.get(f"/desktops/{desktop_id}/screenshot").content)
            assert shot.size == (1920, 1080) and dark_share(shot) < 0.5
            assert [d["desktop_id"] for d in api.get("/desktops").json()["desktops"]] == [desktop_id]
            # Driven like any desktop: an action moves the pointer.
            moved = api.post(f"/desktops/{desktop_id}/actions", json={"type": "move", "x": 300, "y": 200})
            assert moved.status_code == 200 and moved.json()["cursor"] == {"x": 300, "y": 200}, moved.text
            wait_pool_ready(warm_stack)  # the next one, booted behind the claim
            assert sandboxes(warm_stack).keys() == {desktop_id}
        finally:
            assert api.delete(f"/desktops/{desktop_id}").status_code in (200, 204)
        deadline = time.monotonic() + 30
        while desktop_id in sandboxes(warm_stack):
            assert time.monotonic() < deadline, "the claimed desktop was not removed"
            time.sleep(0.5)


def test_another_resolution_is_booted_as_usual(warm_stack: RunningStack) -> None:
    auth = {"Authorization": f"Bearer {warm_stack.desktop_token}"}
    with httpx.Client(base_url=warm_stack.desktop_url, headers=auth, timeout=120, trust_env=False) as api:
        wait_pool_ready(warm_stack)
        created = api.post("/desktops", json={"resolution": "1024x768", "duration": 300})
        assert created.status_code == 201, created.text
        desktop_id = created.json()["desktop_id"]
        try:
            assert sandboxes(warm_stack)[desktop_id]["templateID"] == "desktop"
            assert png(api.get(f"/desktops/{desktop_id}/screenshot").content).size == (1024, 768)
            assert pool_ready(warm_stack) == 1  # the booted one is still waiting
        finally:
            api.delete(f"/desktops/{desktop_id}")
