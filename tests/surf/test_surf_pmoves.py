"""PMOVES' paths into e2b-surf on the real stack: ``POST /surf/scrape`` and the MCP tools on
e2b-mcp-server, and ``e2b.surf.request.v1`` on the embedded NATS. Each run is an e2b-surf session
whose Chromium fetches the test site in the fake internet (run under ``flock /tmp/pmoves-netns.lock``)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import anyio
import httpx
import httpx2
import nats
import pytest
from events.nats_client import synced
from isolation.ns_harness import FAKE_INTERNET_SERVER_IP
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from stack.harness import RunningStack
from surf.agent_harness import EMAIL, FORM_TASK, NAME, FormSite, ModelDoubles
from surf.surf_harness import SurfClient
from surf.surf_site import FOOTER_TEXT, NAV_TEXT, Site

from pmoves_e2b.events import envelope

pytestmark = pytest.mark.stack

RUN_TIMEOUT = 150
# What PMOVES' Agent Zero wrapper sends for e2b.surf.scrape (its defaults), §4.1 of the contract notes.
PMOVES_DEFAULTS = {"depth": 2, "extract_content": True, "follow_links": False}
SOME_URL = f"http://{FAKE_INTERNET_SERVER_IP}/"


def scrape_rest(stack: RunningStack, body: Any, **headers: str) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        f"{stack.mcp_url}/surf/scrape",
        content=content,
        headers={"Content-Type": "application/json", **headers},
        timeout=RUN_TIMEOUT,
        trust_env=False,
    )


def call_tool(stack: RunningStack, name: str, arguments: dict[str, Any]) -> Any:
    async def call() -> Any:
        auth = {"Authorization": f"Bearer {stack.mcp_token}"}
        async with httpx2.AsyncClient(headers=auth, timeout=httpx2.Timeout(30, read=RUN_TIMEOUT)) as http:
            async with Client(streamable_http_client(stack.mcp_url + "/mcp", http_client=http)) as client:
                return await client.call_tool(name, arguments)

    return anyio.run(call)


def ask_nats(stack: RunningStack, raw: bytes) -> envelope.Envelope:
    async def call() -> envelope.Envelope:
        client = await nats.connect(stack.nats_url)
        try:
            reply = await client.request("e2b.surf.request.v1", raw, timeout=RUN_TIMEOUT)
        finally:
            await client.close()
        return envelope.parse(reply.data, "reply")

    return anyio.run(call)


def check_home_page(page: dict[str, Any], site: Site) -> None:
    assert page["url"] == site.url("/") and page["final_url"] == site.url("/")
    assert page["title"] == "Welcome to the harbour"
    assert "HOME-ARTICLE paragraph 1." in page["markdown"]
    assert NAV_TEXT not in page["markdown"] and FOOTER_TEXT not in page["markdown"]
    assert any(link["url"] == site.url("/articles/1") for link in page["links"])


def test_surf_scrape_with_pmoves_payload_answers_the_page_and_is_an_e2b_surf_session(
    surf_stack: RunningStack, surf: SurfClient, site: Site
) -> None:
    # Agent Zero sends X-E2B-API-Key, not Bearer.
    response = scrape_rest(
        surf_stack, {"url": site.url("/"), **PMOVES_DEFAULTS}, **{"X-E2B-API-Key": surf_stack.api_key}
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["state"] == "completed" and answer["page_count"] == 1
    [page] = answer["pages"]
    check_home_page(page, site)
    assert page["screenshot"]["content_type"] == "image/png"
    assert site.hits("/articles/1") == 0  # follow_links false: only the page asked for

    session = surf.get(answer["session_id"])
    assert session["state"] == "completed" and session["request"]["depth"] == 2
    assert session["created_by"] == "api"


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({"url": SOME_URL, "colour": "red"}, "colour: unknown field"),
        ({"url": "ftp://" + SOME_URL[7:]}, "url: must be an absolute http:// or https:// URL"),
        ({"url": SOME_URL, "mode": "agent", "task": "x"}, "mode: /surf/scrape only scrapes"),
        ({"url": SOME_URL, "task": "x"}, "task: not an option of mode 'scrape'"),
        (b"{not json", "the body is not JSON"),
        ([1, 2], "the body must be a JSON object"),
    ],
)
def test_surf_scrape_bad_bodies_get_a_400_naming_the_problem(surf_stack: RunningStack, body: Any, detail: str) -> None:
    response = scrape_rest(surf_stack, body, Authorization=f"Bearer {surf_stack.mcp_token}")
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_request"
    assert detail in response.json()["detail"]


def test_surf_scrape_needs_a_credential(surf_stack: RunningStack) -> None:
    response = scrape_rest(surf_stack, {"url": SOME_URL})
    assert response.status_code == 401


def test_surf_scrape_run_that_times_out_is_a_502_with_its_session(
    surf_stack: RunningStack, surf: SurfClient, site: Site
) -> None:
    body = {"url": site.url("/slow"), "timeout": 3, **PMOVES_DEFAULTS}
    response = scrape_rest(surf_stack, body, Authorization=f"Bearer {surf_stack.mcp_token}")
    assert response.status_code == 502, response.text
    answer = response.json()
    assert answer["error"] == "timeout" and answer["state"] == "failed" and answer["detail"]
    assert surf.get(answer["session_id"])["state"] == "failed"


def test_mcp_tool_surf_scrape_crawls_through_a_real_mcp_client(surf_stack: RunningStack, site: Site) -> None:
    arguments = {"url": site.url("/articles/1"), "follow_links": True, "depth": 2, "max_pages": 3}
    result = call_tool(surf_stack, "surf_scrape", arguments)
    assert not result.is_error, result.content
    answer = result.structured_content
    assert answer["state"] == "completed" and answer["page_count"] == 3
    urls = [page["final_url"] for page in answer["pages"]]
    assert urls[0] == site.url("/articles/1") and len(set(urls)) == 3  # breadth-first from the start page
    assert all(url.startswith(site.url("/")) and "/private/" not in url for url in urls)
    text = result.content[0].text
    assert "ARTICLE-1-BODY paragraph 1." in text and answer["session_id"] in text


def test_mcp_tool_surf_scrape_refusal_is_a_tool_error(surf_stack: RunningStack) -> None:
    result = call_tool(surf_stack, "surf_scrape", {"url": "file:///etc/passwd"})
    assert result.is_error
    assert "invalid_request" in result.content[0].text and "http://" in result.content[0].text


def test_mcp_tool_surf_agent_sends_the_form_through_a_real_mcp_client(
    surf_stack: RunningStack, surf: SurfClient, form_site: FormSite, doubles: ModelDoubles
) -> None:
    before = len(form_site.submissions)
    url = f"http://{FAKE_INTERNET_SERVER_IP}:{form_site.port}/"
    arguments = {"url": url, "task": FORM_TASK, "model": "openai:test-cua", "max_steps": 25}
    result = call_tool(surf_stack, "surf_agent", arguments)
    assert not result.is_error, result.content
    assert form_site.submissions[before:] == [{"name": NAME, "email": EMAIL}]
    answer = result.structured_content
    assert answer["state"] == "completed" and answer["mode"] == "agent"
    assert answer["result"]["message"] == "The page thanks me: the form was sent."
    turns = [step for step in answer["steps"] if step["kind"] == "action"]
    assert turns and turns[-1]["data"]["done"] and turns[0]["data"]["screenshot"]["content_type"] == "image/png"
    assert surf.get(answer["session_id"])["created_by"] == "api"


def test_mcp_tool_surf_agent_with_a_failing_model_is_a_tool_error(
    surf_stack: RunningStack, form_site: FormSite, doubles: ModelDoubles
) -> None:
    doubles.anthropic.fail = (500, doubles.anthropic.error_body("api_error", "Internal server error"))
    url = f"http://{FAKE_INTERNET_SERVER_IP}:{form_site.port}/"
    arguments = {"url": url, "task": FORM_TASK, "model": "anthropic:test-cua", "max_steps": 5, "timeout_seconds": 60}
    result = call_tool(surf_stack, "surf_agent", arguments)
    assert result.is_error
    text = result.content[0].text
    assert ": failed" in text.splitlines()[0] and "model_error" in text and "Internal server error" in text, text
    assert result.structured_content["error"]["code"] == "model_error"


def test_nats_pmoves_flat_request_is_completed_with_the_pages(
    surf_stack: RunningStack, surf: SurfClient, site: Site
) -> None:
    request_id = str(uuid.uuid4())
    raw = json.dumps({"request_id": request_id, "url": site.url("/"), **PMOVES_DEFAULTS}).encode()
    answer = ask_nats(surf_stack, raw)
    assert answer.topic == "e2b.surf.completed.v1", answer.payload
    assert answer.correlation_id == request_id and answer.payload["request_id"] == request_id
    [page] = answer.payload["pages"]
    check_home_page(page, site)
    session = surf.get(answer.payload["session_id"])
    assert session["created_by"] == "nats" and session["state"] == "completed"


def test_nats_envelope_request_that_times_out_is_failed_with_its_session(
    surf_stack: RunningStack, surf: SurfClient, site: Site
) -> None:
    request_id = str(uuid.uuid4())
    message = envelope.build(
        "e2b.surf.request.v1", {"request_id": request_id, "url": site.url("/slow"), "timeout": 3}, "tests"
    )
    answer = ask_nats(surf_stack, message.to_bytes())
    assert answer.topic == "e2b.surf.failed.v1", answer.payload
    assert answer.correlation_id == request_id and answer.parent_id == message.id
    assert answer.payload["code"] == "timeout" and answer.payload["session"]["state"] == "failed"
    assert surf.get(answer.payload["session_id"])["state"] == "failed"


@pytest.mark.parametrize(
    ("payload", "code", "reason"),
    [
        ({"url": SOME_URL, "colour": "red"}, "invalid_request", "colour"),
        ({"depth": 1}, "invalid_request", "url"),
        ({"url": SOME_URL, "task": "x"}, "invalid_request", "task: not an option of mode 'scrape'"),
    ],
)
def test_nats_bad_requests_are_failed_naming_the_field(
    surf_stack: RunningStack, payload: dict[str, Any], code: str, reason: str
) -> None:
    request_id = str(uuid.uuid4())
    answer = ask_nats(surf_stack, json.dumps({"request_id": request_id, **payload}).encode())
    assert answer.topic == "e2b.surf.failed.v1"
    assert answer.correlation_id == request_id
    assert answer.payload["code"] == code and reason in answer.payload["reason"]


def test_nats_published_request_is_answered_once_on_the_completed_subject(
    surf_stack: RunningStack, surf: SurfClient, site: Site
) -> None:
    # PMOVES' direction: publish the request, subscribe to the answers (no request-reply).
    request_id = str(uuid.uuid4())

    async def scenario() -> list[envelope.Envelope]:
        client = await nats.connect(surf_stack.nats_url)
        answers: list[envelope.Envelope] = []

        async def collect(msg: Any) -> None:
            answer = envelope.parse(msg.data, msg.subject)
            if answer.correlation_id == request_id:
                answers.append(answer)

        try:
            await client.subscribe("e2b.surf.completed.v1", cb=collect)
            await client.subscribe("e2b.surf.failed.v1", cb=collect)
            await synced(client)
            body = {"request_id": request_id, "url": site.url("/"), **PMOVES_DEFAULTS}
            await client.publish("e2b.surf.request.v1", json.dumps(body).encode())
            with anyio.fail_after(RUN_TIMEOUT):
                while not answers:
                    await anyio.sleep(0.1)
            await anyio.sleep(1)  # a duplicate answer would arrive by now
        finally:
            await client.close()
        return answers

    [answer] = anyio.run(scenario)
    assert answer.topic == "e2b.surf.completed.v1", answer.payload
    check_home_page(answer.payload["pages"][0], site)
    assert surf.get(answer.payload["session_id"])["created_by"] == "nats"


def test_nats_requests_are_served_by_e2b_surf_as_queue_group(surf_stack: RunningStack) -> None:
    # A queue group: more e2b-surf instances share the requests, each is served once.
    monitor = surf_stack.settings_env["E2B_NATS_MONITOR_PORT"]
    connz = httpx.get(f"http://127.0.0.1:{monitor}/connz?subs=detail", timeout=10, trust_env=False).json()
    subs = [
        (conn.get("name"), sub["subject"], sub.get("qgroup"))
        for conn in connz["connections"]
        for sub in conn.get("subscriptions_list_detail", [])
        if sub["subject"] == "e2b.surf.request.v1"
    ]
    assert subs and all(qgroup == "e2b-surf" for _, _, qgroup in subs), subs
