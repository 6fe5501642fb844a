"""The REST contract the SDKs rely on, checked with raw HTTP: auth, errors, limits, idempotency."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.stack


@pytest.fixture()
def api(running_stack):  # type: ignore[no-untyped-def]
    with httpx.Client(
        base_url=running_stack.sandbox_url, timeout=60, headers={"X-API-KEY": running_stack.api_key}
    ) as client:
        yield client


def kill(api: httpx.Client, sandbox_id: str) -> None:
    api.delete(f"/sandboxes/{sandbox_id}")


def test_health_needs_no_key_and_everything_else_does(running_stack) -> None:  # type: ignore[no-untyped-def]
    assert httpx.get(running_stack.sandbox_url + "/health").status_code == 200
    missing = httpx.get(running_stack.sandbox_url + "/v2/sandboxes")
    assert missing.status_code == 401
    assert missing.json()["code"] == 401 and "X-API-KEY" in missing.json()["message"]
    wrong = httpx.get(running_stack.sandbox_url + "/v2/sandboxes", headers={"X-API-KEY": "e2b_wrong"})
    assert wrong.status_code == 401
    assert wrong.headers["Should-Retry"] == "false"


def test_pmoves_header_is_accepted(running_stack) -> None:  # type: ignore[no-untyped-def]
    res = httpx.get(running_stack.sandbox_url + "/v2/sandboxes", headers={"X-E2B-API-Key": running_stack.api_key})
    assert res.status_code == 200 and isinstance(res.json(), list)


@pytest.mark.parametrize(
    "body, needle",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"templateID": 5}', "templateID"),
        (b'{"templateID": "base", "timeout": "soon"}', "timeout"),
        (b'{"templateID": "base", "metadata": {"a": 1}}', "metadata"),
        (b'{"templateID": "base", "timeout": 99999999}', "maximum"),
    ],
)
def test_bad_create_bodies_get_400_with_a_message(api: httpx.Client, body: bytes, needle: str) -> None:
    res = api.post("/v2/sandboxes", content=body, headers={"Content-Type": "application/json"})
    assert res.status_code == 400, res.text
    assert needle in res.json()["message"]


def test_huge_body_is_refused(api: httpx.Client) -> None:
    res = api.post("/v2/sandboxes", content=b'{"metadata": {"a": "' + b"x" * (2 << 20) + b'"}}')
    assert res.status_code == 413


def test_unknown_sandbox_is_404_json(api: httpx.Client) -> None:
    for method, path in [
        ("GET", "/sandboxes/nope"),
        ("DELETE", "/sandboxes/nope"),
        ("POST", "/sandboxes/nope/pause"),
        ("POST", "/v2/sandboxes/nope/connect"),
    ]:
        res = api.request(method, path, json={})
        assert res.status_code == 404, (method, path, res.text)
        assert res.json()["code"] == 404


def test_unknown_template_is_404(api: httpx.Client) -> None:
    res = api.post("/v2/sandboxes", json={"templateID": "nope"})
    assert res.status_code == 404 and "nope" in res.json()["message"]


def test_idempotency_key_returns_the_same_sandbox(api: httpx.Client) -> None:
    headers = {"Idempotency-Key": "compat-idem-1"}
    first = api.post("/v2/sandboxes", json={"templateID": "base", "timeout": 60}, headers=headers)
    second = api.post("/v2/sandboxes", json={"templateID": "base", "timeout": 60}, headers=headers)
    try:
        assert first.status_code == second.status_code == 201
        assert first.json()["sandboxID"] == second.json()["sandboxID"]
        other = api.post("/v2/sandboxes", json={"templateID": "base", "timeout": 61}, headers=headers)
        assert other.status_code == 409
    finally:
        kill(api, first.json()["sandboxID"])


def test_concurrency_limit_answers_429(api: httpx.Client, running_stack) -> None:  # type: ignore[no-untyped-def]
    created: list[str] = []
    try:
        while True:
            res = api.post("/v2/sandboxes", json={"templateID": "base", "timeout": 60})
            if res.status_code != 201:
                break
            created.append(res.json()["sandboxID"])
            assert len(created) <= running_stack.max_sandboxes
        assert res.status_code == 429, res.text
        assert "E2B_MAX_SANDBOXES" in res.json()["message"]
        assert len(api.get("/v2/sandboxes").json()) == running_stack.max_sandboxes
    finally:
        for sandbox_id in created:
            kill(api, sandbox_id)


def test_openapi_document_lists_the_e2b_paths(running_stack) -> None:  # type: ignore[no-untyped-def]
    doc = httpx.get(running_stack.sandbox_url + "/openapi.json").json()
    for path in ("/v2/sandboxes", "/sandboxes/{sandbox_id}", "/sandboxes/{sandbox_id}/pause"):
        assert path in doc["paths"]


def test_prometheus_metrics_have_the_names_pmoves_expects(api: httpx.Client, running_stack) -> None:  # type: ignore[no-untyped-def]
    created = api.post("/v2/sandboxes", json={"templateID": "base", "timeout": 60}).json()["sandboxID"]
    try:
        assert api.get(f"/sandboxes/{created}/metrics").status_code == 200  # samples memory now
        text = httpx.get(running_stack.sandbox_url + "/metrics").text
        assert "e2b_sandboxes_active " in text
        assert 'e2b_sandboxes_created_total{template="base"}' in text
        assert 'e2b_sandbox_memory_bytes{quantile="0.95"}' in text
        assert "e2b_sandbox_create_seconds_bucket" in text
        # /metrics needs no key, so it must not list sandbox ids (they address sandbox ports).
        assert created not in text
    finally:
        kill(api, created)


def test_audit_events_record_who_created_and_killed(api: httpx.Client, running_stack) -> None:  # type: ignore[no-untyped-def]
    from pmoves_e2b.store import repo
    from pmoves_e2b.store.db import Database

    created = api.post("/v2/sandboxes", json={"templateID": "base", "timeout": 60}).json()["sandboxID"]
    kill(api, created)
    db = Database(f"sqlite:///{running_stack.data_dir / 'pmoves-e2b.db'}")
    try:
        actions = [(e.action, e.actor) for e in repo.audit_events(db, created)]
    finally:
        db.close()
    assert actions == [("sandbox.create", "configured"), ("sandbox.kill", "configured")]


def test_keys_made_with_the_cli_work_until_revoked(running_stack) -> None:  # type: ignore[no-untyped-def]
    made = running_stack.cli("keys", "create", "--name", "ci-key")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]
    key_id = next(word for word in made.stdout.split() if word.startswith("key_"))
    url = running_stack.sandbox_url + "/v2/sandboxes"
    assert httpx.get(url, headers={"X-API-KEY": key}).status_code == 200
    listed = running_stack.cli("keys", "list")
    assert key_id in listed.stdout and key not in listed.stdout
    assert running_stack.cli("keys", "revoke", key_id).returncode == 0
    assert httpx.get(url, headers={"X-API-KEY": key}).status_code == 401
    assert running_stack.cli("keys", "revoke", key_id).returncode == 1


@pytest.mark.parametrize("query", ["limit=0", "limit=101", "limit=x", "state=dead", "nextToken=%%%"])
def test_bad_list_queries_get_400(api: httpx.Client, query: str) -> None:
    res = api.get(f"/v2/sandboxes?{query}")
    assert res.status_code == 400, res.text
    assert res.json()["code"] == 400
