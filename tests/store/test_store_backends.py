"""The store behaves the same on SQLite (the default) and on a real PostgreSQL server (by URL)."""

from __future__ import annotations

import hashlib
import secrets
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import OperationalError

from pmoves_e2b.store import repo, template_builds
from pmoves_e2b.store.db import MIGRATIONS_DIR, Database
from pmoves_e2b.store.models import ApiKeyRow, IdempotencyRow, SandboxRow, TemplateRow


def _alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


TABLES = {
    "sandboxes",
    "api_keys",
    "templates",
    "audit_events",
    "idempotency_keys",
    "alembic_version",
    "surf_sessions",
    "surf_steps",
    "surf_pages",
    "event_outbox",
    "template_builds",
}
HEAD = "0005"  # the newest migration
NESTED = {
    "team": {"name": "ops", "tags": ["a", "b"], "limits": {"cpu": 1.5, "gpu": None}},
    "flags": [True, False, None, 0, -1, 3.25, "x"],
    "unicode": "grüße ✓ 世界",
    "empty": {},
}


@pytest.fixture()
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    yield database
    database.close()


def sandbox_row(
    sandbox_id: str,
    template: str = "base",
    started_at: datetime | None = None,
    **extra: Any,
) -> SandboxRow:
    started = started_at or repo.utcnow()
    values: dict[str, Any] = dict(
        sandbox_id=sandbox_id,
        template_id=template,
        state="running",
        started_at=started,
        end_at=started + timedelta(minutes=5),
        cpu_count=1.0,
        memory_mb=512,
        disk_mb=1024,
        allow_internet=True,
        auto_pause=False,
        metadata_={},
        env_vars={},
        envd_access_token="tok-" + sandbox_id,
        api_key_id="key_1",
        handle={},
    )
    values.update(extra)
    return SandboxRow(**values)


def run_in_threads(count: int, work: Callable[[int], Any]) -> list[Any]:
    """Start ``count`` calls at the same moment; re-raise the first failure."""
    barrier = threading.Barrier(count)

    def call(i: int) -> Any:
        barrier.wait(timeout=30)
        return work(i)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(call, range(count), timeout=120))


def test_migrations_create_the_schema_from_empty_and_reopening_keeps_data(db_url: str) -> None:
    first = Database(db_url)
    try:
        assert set(inspect(first.engine).get_table_names()) == TABLES
        with first.engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == HEAD
        key_id, key = repo.create_api_key(first, "kept")
        assert first.ping()
    finally:
        first.close()
    second = Database(db_url)  # migrations run again on open: a no-op
    try:
        with second.engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar_one() == 1
        assert repo.find_api_key(second, key) == key_id
    finally:
        second.close()


def test_processes_starting_together_on_an_empty_database_all_come_up(db_url: str) -> None:
    # The service, `pmoves-e2b down` and `keys create` each open (and migrate) the database.
    opener = "import sys; from pmoves_e2b.store.db import Database; Database(sys.argv[1]).close()"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", opener, db_url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(3)
    ]
    outputs = [(proc.communicate(timeout=120)[0], proc.returncode) for proc in procs]
    assert all(code == 0 for _, code in outputs), outputs
    database = Database(db_url)
    try:
        with database.engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [HEAD]
    finally:
        database.close()


def test_api_keys_are_stored_hashed_found_and_revoked(db: Database) -> None:
    key_id, key = repo.create_api_key(db, "ci")
    other_id, other = repo.create_api_key(db, "other")
    assert repo.find_api_key(db, key) == key_id
    assert repo.find_api_key(db, "e2b_" + "0" * 40) is None

    with db.session() as s:
        row = s.get(ApiKeyRow, key_id)
        assert row is not None
        assert row.key_hash == hashlib.sha256(key.encode()).hexdigest()
        stored = [str(v) for v in (row.key_id, row.name, row.key_hash, row.prefix)]
    assert not any(key in value for value in stored), "the key itself must never be stored"
    assert [k.key_id for k in repo.list_api_keys(db)] == [key_id, other_id]

    assert repo.revoke_api_key(db, key_id) is True
    assert repo.revoke_api_key(db, key_id) is False
    assert repo.revoke_api_key(db, "key_missing") is False
    assert repo.find_api_key(db, key) is None
    assert repo.find_api_key(db, other) == other_id


def test_sandboxes_round_trip_update_and_live_listing(db: Database) -> None:
    now = repo.utcnow()
    repo.add_sandbox(db, sandbox_row("sb-b", started_at=now + timedelta(seconds=1)))
    repo.add_sandbox(
        db,
        sandbox_row(
            "sb-a",
            started_at=now,
            template="code-interpreter-v1",
            metadata_=NESTED,
            env_vars={"A": "1", "PATH": "/x:/y"},
            handle={"address": "10.77.0.2", "pids": [10, 11], "netns": {"name": "e2b-a"}},
        ),
    )
    row = repo.get_sandbox(db, "sb-a")
    assert row is not None
    assert row.metadata_ == NESTED
    assert row.env_vars == {"A": "1", "PATH": "/x:/y"}
    assert row.handle == {"address": "10.77.0.2", "pids": [10, 11], "netns": {"name": "e2b-a"}}
    assert (row.cpu_count, row.memory_mb, row.allow_internet, row.auto_pause) == (1.0, 512, True, False)
    assert repo.get_sandbox(db, "sb-missing") is None
    assert [r.sandbox_id for r in repo.live_sandboxes(db)] == ["sb-a", "sb-b"]
    assert repo.live_totals(db)[0] == 2

    paused = repo.update_sandbox(db, "sb-a", state="paused", paused_remaining_s=12.5, handle={**NESTED, "paused": True})
    assert paused is not None and paused.state == "paused"
    again = repo.get_sandbox(db, "sb-a")
    assert again is not None and again.paused_remaining_s == 12.5 and again.handle == {**NESTED, "paused": True}
    assert repo.update_sandbox(db, "sb-missing", state="killed") is None

    killed_at = repo.utcnow()
    repo.update_sandbox(db, "sb-b", state="killed", killed_at=killed_at, kill_reason="timeout")
    assert [r.sandbox_id for r in repo.live_sandboxes(db)] == ["sb-a"]
    assert repo.live_totals(db)[0] == 1
    gone = repo.get_sandbox(db, "sb-b")
    assert gone is not None and gone.killed_at == killed_at and gone.kill_reason == "timeout"
    with db.session() as s:
        assert {t.name: t.sandboxes_created for t in s.scalars(select(TemplateRow))} == {
            "base": 1,
            "code-interpreter-v1": 1,
        }


def test_datetimes_come_back_aware_in_utc_and_equal(db: Database) -> None:
    # An offset that is neither UTC nor the Postgres server's zone, with microseconds.
    started = datetime(2026, 3, 29, 1, 30, 15, 123456, tzinfo=timezone(timedelta(hours=-7, minutes=-30)))
    repo.add_sandbox(db, sandbox_row("sb-tz", started_at=started))
    row = repo.get_sandbox(db, "sb-tz")
    assert row is not None
    for value, expected in ((row.started_at, started), (row.end_at, started + timedelta(minutes=5))):
        assert value.tzinfo is not None and value.utcoffset() == timedelta(0)
        assert value == expected
        assert value.isoformat() == expected.astimezone(UTC).isoformat()
    # Ordering and comparisons happen in the database too.
    with db.session() as s:
        found = s.scalars(select(SandboxRow.sandbox_id).where(SandboxRow.started_at == started)).all()
    assert found == ["sb-tz"]


def test_audit_events_keep_order_detail_and_filter_by_sandbox(db: Database) -> None:
    repo.audit(db, "key_1", "sandbox.create", "sb-1", template="base", nested=NESTED)
    repo.audit(db, "key_2", "keys.revoke")
    repo.audit(db, "key_1", "sandbox.kill", "sb-1", reason="user")
    events = repo.audit_events(db)
    assert [(e.actor, e.action, e.sandbox_id) for e in events] == [
        ("key_1", "sandbox.create", "sb-1"),
        ("key_2", "keys.revoke", None),
        ("key_1", "sandbox.kill", "sb-1"),
    ]
    assert events[0].detail == {"template": "base", "nested": NESTED}
    assert all(e.ts.tzinfo is not None for e in events)
    assert [e.action for e in repo.audit_events(db, "sb-1")] == ["sandbox.create", "sandbox.kill"]
    assert repo.audit_events(db, "sb-none") == []


def test_idempotency_keys_are_replayed_overwritten_and_expire(db: Database) -> None:
    repo.put_idempotent(db, "key_1", "req-1", "hash-1", 201, '{"sandboxID": "sb-1"}')
    stored = repo.get_idempotent(db, "key_1", "req-1")
    assert stored is not None and (stored.request_hash, stored.status_code, stored.response) == (
        "hash-1",
        201,
        '{"sandboxID": "sb-1"}',
    )
    assert repo.get_idempotent(db, "key_2", "req-1") is None  # keys are per API key

    repo.put_idempotent(db, "key_1", "req-1", "hash-2", 400, '{"code": 400}')
    replaced = repo.get_idempotent(db, "key_1", "req-1")
    assert replaced is not None and (replaced.request_hash, replaced.status_code) == ("hash-2", 400)

    with db.session() as s:
        row = s.get(IdempotencyRow, ("key_1", "req-1"))
        assert row is not None
        row.created_at = repo.utcnow() - repo.IDEMPOTENCY_TTL - timedelta(seconds=1)
    assert repo.get_idempotent(db, "key_1", "req-1") is None
    with db.session() as s:
        assert s.get(IdempotencyRow, ("key_1", "req-1")) is None, "expired keys are deleted"


def test_template_builds_round_trip_and_unfinished_ones_are_failed(db: Database) -> None:
    entries = [{"timestamp": "2026-12-05T19:00:00+00:00", "level": "info", "message": "grüße ✓"}]
    build = {
        "build_id": "b-1",
        "template_id": "mine",
        "status": "building",
        "tags": ["v1", "default"],
        "cpu_count": 1.5,
        "memory_mb": 512,
        "reason": "",
        "step": "2",
        "entries": entries,
        "created_at": "2026-12-05T19:00:00+00:00",
        "updated_at": "2026-12-05T19:00:01+00:00",
        "finished_at": "",
    }
    template_builds.save(db, build)
    template_builds.save(db, build | {"build_id": "b-0", "status": "ready", "created_at": "2026-12-05T18:00:00+00:00"})
    assert template_builds.load(db, "b-1") == build
    assert [b["build_id"] for b in template_builds.of_template(db, "mine")] == ["b-0", "b-1"]
    assert template_builds.of_template(db, "other") == [] and template_builds.load(db, "nope") is None
    assert template_builds.interrupt_unfinished(db, "cut") == 1
    cut = template_builds.load(db, "b-1")
    assert cut is not None and (cut["status"], cut["reason"]) == ("error", "cut") and cut["finished_at"]
    assert template_builds.load(db, "b-0")["status"] == "ready"  # type: ignore[index]


def test_concurrent_writers_lose_no_updates(db: Database) -> None:
    threads, per_thread = 6, 5

    def create(worker: int) -> None:
        for i in range(per_thread):
            repo.add_sandbox(db, sandbox_row(f"sb-{worker}-{i}", template="shared"))
            repo.audit(db, f"key_{worker}", "sandbox.create", f"sb-{worker}-{i}")
            repo.put_idempotent(db, "key_1", "same-request", f"hash-{worker}", 201, "{}")

    run_in_threads(threads, create)
    total = threads * per_thread
    assert repo.live_totals(db)[0] == total
    assert len(repo.audit_events(db)) == total
    with db.session() as s:
        template = s.get(TemplateRow, "shared")
        assert template is not None and template.sandboxes_created == total

    def update(worker: int) -> None:
        for i in range(per_thread):
            repo.update_sandbox(db, f"sb-{worker}-{i}", state="paused", handle={"worker": worker, "i": i})

    run_in_threads(threads, update)
    rows = {r.sandbox_id: r for r in repo.live_sandboxes(db)}
    assert len(rows) == total and all(r.state == "paused" for r in rows.values())
    assert all(rows[f"sb-{w}-{i}"].handle == {"worker": w, "i": i} for w in range(threads) for i in range(per_thread))


def test_plain_postgres_urls_as_supabase_prints_them_work(postgres_url: str) -> None:
    for scheme in ("postgresql://", "postgres://"):
        database = Database(postgres_url.replace("postgresql+psycopg://", scheme))
        try:
            assert database.engine.dialect.driver == "psycopg"
            assert database.ping()
        finally:
            database.close()


def test_a_wrong_password_fails_clearly_without_echoing_it(postgres_url: str) -> None:
    wrong = "wrong-" + secrets.token_hex(8)
    user_part, host_part = postgres_url.split("@", 1)
    bad_url = user_part.rsplit(":", 1)[0] + ":" + wrong + "@" + host_part
    with pytest.raises(OperationalError) as failure:
        Database(bad_url)
    message = str(failure.value)
    assert "password authentication failed" in message
    assert wrong not in message


def test_no_server_side_prepared_statements_so_transaction_poolers_work(postgres_url: str) -> None:
    # Supabase's transaction pooler hands each transaction to any server connection.
    database = Database(postgres_url)
    try:
        for _ in range(10):  # psycopg would prepare after 5 runs of one query by default
            repo.live_totals(database)
        with database.engine.connect() as conn:
            for _ in range(10):
                conn.execute(text("SELECT count(*) FROM sandboxes")).scalar_one()
            assert conn.execute(text("SELECT count(*) FROM pg_prepared_statements")).scalar_one() == 0
    finally:
        database.close()


def test_health_ping_follows_postgres_going_away_and_coming_back(  # type: ignore[no-untyped-def]
    postgres_url: str,
    postgres_server,
) -> None:
    database = Database(postgres_url)
    try:
        assert database.ping()
        postgres_server.stop()
        postgres_server.start()
        # The pooled connection died with the server: pre_ping replaces it on first use.
        assert database.ping()
        repo.audit(database, "key_1", "after.restart")
        postgres_server.stop()
        try:
            assert database.ping() is False  # reports, never raises
        finally:
            postgres_server.start()
        assert database.ping()
        assert [e.action for e in repo.audit_events(database)] == ["after.restart"]
    finally:
        database.close()


def test_migrations_are_one_line_of_revisions_ending_at_head() -> None:
    # Two migrations revising the same one (two engineers adding one each) make two heads: upgrade fails.
    assert ScriptDirectory.from_config(_alembic_config()).get_heads() == [HEAD]


def test_outbox_events_commit_with_their_state_change_and_come_back_in_order(db: Database) -> None:
    first = {"id": "e-1", "topic": "e2b.sandbox.created.v1", "payload": {"n": 1}}
    second = {"id": "e-2", "topic": "e2b.sandbox.killed.v1", "payload": {"n": 2}}
    repo.add_sandbox(db, sandbox_row("ob1"), outbox=[first])
    repo.update_sandbox(db, "ob1", state="killed", outbox=[second])
    # A change that fails (the same event id twice) leaves neither the state nor its event behind.
    with pytest.raises(Exception):  # noqa: B017 - the backend's own IntegrityError
        repo.update_sandbox(db, "ob1", state="paused", outbox=[second])
    assert repo.get_sandbox(db, "ob1").state == "killed"  # type: ignore[union-attr]
    pending = repo.pending_outbox(db, 10)
    assert [event for _, event in pending] == [first, second]
    repo.delete_outbox(db, [pending[0][0]])
    assert [event for _, event in repo.pending_outbox(db, 10)] == [second]
