"""A whole stack on Postgres (E2B_DATABASE_URL): the stock SDK works and the rows land in Postgres."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from e2b import AuthenticationException, Sandbox, SandboxQuery
from stack.harness import RunningStack

from pmoves_e2b.store import repo
from pmoves_e2b.store.db import Database

pytestmark = pytest.mark.stack


def test_stack_on_postgres_runs_the_sdk_and_records_the_kill(
    postgres_url: str,
    postgres_server,
    stack_factory: Callable[..., RunningStack],  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No warm pool: this test is about the database, not create latency.
    stack = stack_factory(extra_env={"E2B_DATABASE_URL": postgres_url, "E2B_POOL_SIZE": "0"})
    for name in list(os.environ):
        if name.startswith("E2B_"):
            monkeypatch.delenv(name)
    for name, value in stack.sdk_env.items():
        monkeypatch.setenv(name, value)

    code, health = stack.health("sandbox")
    assert code == 200 and health["dependencies"]["database"] == "ok"

    sandbox = Sandbox.create(template="base", timeout=120, metadata={"suite": "store-postgres"})
    try:
        assert sandbox.commands.run("echo on-postgres").stdout.strip() == "on-postgres"
        listed = Sandbox.list(query=SandboxQuery(metadata={"suite": "store-postgres"})).next_items()
        assert [s.sandbox_id for s in listed] == [sandbox.sandbox_id]
    finally:
        sandbox.kill()
    assert Sandbox.list(query=SandboxQuery(metadata={"suite": "store-postgres"})).next_items() == []

    database = Database(postgres_url)
    try:
        row = repo.get_sandbox(database, sandbox.sandbox_id)
        assert row is not None
        assert row.state == "killed" and row.killed_at is not None and row.killed_at.tzinfo is not None
        assert row.metadata_ == {"suite": "store-postgres"}
        actions = [e.action for e in repo.audit_events(database, sandbox.sandbox_id)]
        assert actions[0] == "sandbox.create" and "sandbox.kill" in actions
    finally:
        database.close()
    # `pmoves-e2b keys` writes to the same Postgres database the service reads.
    made = stack.cli("keys", "create", "--name", "pg-key")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]
    key_id = next(word for word in made.stdout.split() if word.startswith("key_"))
    assert Sandbox.list(api_key=key).next_items() == []
    assert stack.cli("keys", "revoke", key_id).returncode == 0
    with pytest.raises(AuthenticationException):
        Sandbox.list(api_key=key).next_items()
    assert not (stack.data_dir / "pmoves-e2b.db").exists(), "the default SQLite file must not be used"

    logs = {path.name: path.read_text(errors="replace") for path in (stack.data_dir / "logs").glob("*.log")}
    assert logs, "the stack wrote no logs"
    leaked = [name for name, text in logs.items() if postgres_server.password in text]
    assert not leaked, f"the database password appears in {leaked}"
