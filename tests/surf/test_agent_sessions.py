"""Agent mode through e2b-surf's API: the surf stack's model settings point at local services
speaking OpenAI's and Anthropic's computer-use wire formats and OpenAI-compatible chat
(``model_doubles``), whose scripted
policy reads the screenshots. ``POST /api/surf`` with ``mode: agent`` must get the form of a site
in the fake internet filled and sent; take-over and hand-back go through the endpoints; a failing
model fails the session with the provider's error. Run under ``flock /tmp/pmoves-netns.lock``.
"""

from __future__ import annotations

import time

import pytest
from isolation.ns_harness import FAKE_INTERNET_SERVER_IP
from surf.agent_harness import EMAIL, FORM_TASK, MODEL_KEY, NAME, FormSite, ModelDoubles, png_image
from surf.surf_harness import FINAL, SurfClient

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def start(surf: SurfClient, site: FormSite, model: str) -> str:
    url = f"http://{FAKE_INTERNET_SERVER_IP}:{site.port}/"
    return str(surf.start(mode="agent", url=url, task=FORM_TASK, model=model, max_steps=25)["session_id"])


@pytest.mark.parametrize("model", ["openai:test-cua", "anthropic:test-cua", "openai-compatible:test-vl"])
def test_an_agent_session_sends_the_form(
    surf: SurfClient, form_site: FormSite, doubles: ModelDoubles, model: str
) -> None:
    before = len(form_site.submissions)
    session = surf.wait(start(surf, form_site, model))
    assert session["state"] == "completed", session.get("error")
    assert form_site.submissions[before:] == [{"name": NAME, "email": EMAIL}]
    assert session["result"]["message"] == "The page thanks me: the form was sent."
    assert session["result"]["model"] == model
    assert session["steps"][0]["kind"] == "navigate"
    turns = [s for s in session["steps"] if s["kind"] == "action"]
    assert turns and turns[-1]["data"]["done"]
    assert any(s["data"]["action"].startswith("click (") for s in turns)
    assert any(f"type {NAME!r}" in s["data"]["action"] for s in turns)
    for step in turns:
        assert step["data"]["reasoning"]
        shot = surf.http.get(step["data"]["screenshot"]["url"])
        assert shot.status_code == 200 and png_image(shot.content).size == (1280, 800)


def test_steps_arrive_live_as_events(surf: SurfClient, form_site: FormSite, doubles: ModelDoubles) -> None:
    session_id = start(surf, form_site, "anthropic:test-cua")
    events = surf.events(session_id)
    steps = [e["step"] for e in events if e["type"] == "step"]
    assert [e["state"] for e in events if e["type"] == "state"][-1] == "completed"
    assert steps and steps[-1]["data"]["done"] and all("screenshot" in s["data"] for s in steps[1:])
    assert events[-2]["type"] == "result"


def test_a_person_takes_over_and_hands_back(surf: SurfClient, form_site: FormSite, doubles: ModelDoubles) -> None:
    before = len(form_site.submissions)
    session_id = start(surf, form_site, "openai:test-cua")
    surf.wait(session_id, ("running", *FINAL))
    taken = surf.http.post(f"/api/sessions/{session_id}/takeover")
    assert taken.status_code == 200 and taken.json()["taken_over"] is True
    time.sleep(2)  # the turn in flight ends
    asked = len(doubles.openai.requests)
    time.sleep(3)
    assert len(doubles.openai.requests) == asked, "the model was asked while a person had the desktop"
    assert surf.get(session_id)["taken_over"] is True
    back = surf.http.post(f"/api/sessions/{session_id}/handback")
    assert back.status_code == 200 and back.json()["taken_over"] is False
    session = surf.wait(session_id)
    assert session["state"] == "completed", session.get("error")
    assert form_site.submissions[before:] == [{"name": NAME, "email": EMAIL}]


@pytest.mark.parametrize("status", [500, 401])
def test_a_model_error_fails_the_session_cleanly(
    surf: SurfClient, form_site: FormSite, doubles: ModelDoubles, status: int
) -> None:
    double = doubles.anthropic
    kind, message = (
        ("api_error", "Internal server error") if status == 500 else ("authentication_error", "invalid x-api-key")
    )
    double.fail = (status, double.error_body(kind, message))
    session = surf.wait(start(surf, form_site, "anthropic:test-cua"), timeout=120)
    assert session["state"] == "failed"
    error = session["error"]
    assert f"HTTP {status}" in error["message"] and message in error["message"]
    assert error["code"] == ("model_error" if status == 500 else "model_auth")
    assert MODEL_KEY not in str(session) and MODEL_KEY not in surf.stack.log("surf")
    assert surf.stack.processes()  # the service is still up
    assert surf.http.get("/api/health").status_code == 200


def test_an_unknown_model_provider_is_a_400(surf: SurfClient, form_site: FormSite) -> None:
    url = f"http://{FAKE_INTERNET_SERVER_IP}:{form_site.port}/"
    answer = surf.http.post(
        "/api/surf", json={"mode": "agent", "url": url, "task": FORM_TASK, "model": "google:gemini"}
    )
    assert answer.status_code == 400
    assert answer.json()["error"] == "invalid_request" and "provider:model" in answer.json()["detail"]
