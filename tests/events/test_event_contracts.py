"""contracts/: every registered subject has a valid schema; envelopes round-trip and are checked."""

from __future__ import annotations

import json

import pytest

from pmoves_e2b.config import SERVICES, load_settings
from pmoves_e2b.events import envelope, schemas, subjects
from pmoves_e2b.events.schemas import ContractError
from pmoves_e2b.service import announce_payload


def test_every_topic_points_at_a_schema_file_that_compiles():
    contracts = schemas.contracts()
    assert contracts.topics, "topics.json lists no subjects"
    for topic in contracts.topics.values():
        # Compiles (incl. relative $refs) and accepts nothing that is not an object.
        validator = contracts.validator(topic.schema_path)
        assert not validator.is_valid("not an object"), topic.name


def test_registry_covers_the_subjects_the_code_uses():
    names = schemas.contracts().topics
    wanted = [
        subjects.SERVICES_ANNOUNCE,
        *(subjects.sandbox_lifecycle(k) for k in subjects.LIFECYCLE_KINDS),
        "e2b.spell.execute.v1",
        "e2b.spell.completed.v1",
        "e2b.spell.failed.v1",
    ]
    assert [name for name in wanted if name not in names] == []


def test_envelope_round_trip_keeps_every_field_and_validates():
    sent = envelope.build(
        "e2b.sandbox.created.v1",
        {"sandbox_id": "abc", "template": "base", "metadata": {"k": "v"}},
        "e2b-sandbox",
        correlation_id="req-1",
        parent_id="p-1",
        actor="agent-zero",
        labels=["x"],
    )
    received = envelope.parse(sent.to_bytes(), "e2b.sandbox.created.v1")
    assert received == sent
    schemas.check_envelope(received)
    assert json.loads(sent.to_bytes())["ts"].endswith("Z")


def test_flat_legacy_request_is_wrapped_and_validated_against_its_subject():
    raw = json.dumps(
        {"request_id": "r-9", "agent_id": "agent-zero", "spell_name": "run-python", "parameters": {"code": "print(1)"}}
    )
    message = envelope.parse(raw, "e2b.spell.execute.v1")
    assert message.legacy and message.correlation_id == "r-9" and message.actor == "agent-zero"
    schemas.check_envelope(message, "e2b.spell.execute.v1")


@pytest.mark.parametrize(
    ("subject", "payload", "field"),
    [
        ("e2b.sandbox.killed.v1", {"sandbox_id": "a", "template": "base", "metadata": {"n": 1}}, "payload.metadata.n"),
        ("e2b.sandbox.created.v1", {"template": "base", "metadata": {}}, "payload: 'sandbox_id' is a required"),
        ("e2b.spell.execute.v1", {"spell_name": "Bad Name"}, "payload.spell_name"),
        ("e2b.spell.execute.v1", {"spell_name": "run-python", "timeout": 0}, "payload.timeout"),
        ("e2b.spell.failed.v1", {"code": "x", "request_subject": "s"}, "'reason' is a required"),
    ],
)
def test_invalid_payload_names_the_field(subject, payload, field):
    with pytest.raises(ContractError) as caught:
        schemas.check_payload(subject, payload)
    assert field in str(caught.value)


def test_unknown_subject_is_refused_with_a_hint():
    with pytest.raises(ContractError, match="no contract: register it in .*topics.json"):
        schemas.check_payload("e2b.nothing.v1", {})


def test_envelope_with_an_extra_field_is_refused():
    sent = envelope.build("test.e2b.v1", {}, "tests").to_dict()
    with pytest.raises(envelope.EnvelopeError, match="unknown field"):
        envelope.parse(json.dumps({**sent, "extra": 1}), "test.e2b.v1")


def test_announce_payload_of_every_service_matches_its_contract(tmp_path):
    settings = load_settings(e2b_data_dir=tmp_path)
    for service in SERVICES:
        schemas.check_payload(subjects.SERVICES_ANNOUNCE, announce_payload(service, settings))


def test_spell_run_files_need_content_or_url():
    run = {
        "run_id": "r",
        "spell_name": "s",
        "spell_version": "1",
        "status": "completed",
        "stdout": "",
        "stderr": "",
        "result": None,
        "duration_seconds": 0.1,
        "files": [{"name": "a.png", "size": 3, "mime_type": "image/png"}],
    }
    with pytest.raises(ContractError, match=r"payload.files\[0\]"):
        schemas.check_payload("e2b.spell.completed.v1", run)
    run["files"][0]["content_base64"] = "AAAA"
    schemas.check_payload("e2b.spell.completed.v1", run)
