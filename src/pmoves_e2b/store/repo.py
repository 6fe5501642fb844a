"""Queries the services use; everything else goes through these functions."""

from __future__ import annotations

import functools
import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, bindparam, delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from pmoves_e2b.store.db import Database
from pmoves_e2b.store.models import ApiKeyRow, AuditEventRow, IdempotencyRow, OutboxRow, SandboxRow, TemplateRow

IDEMPOTENCY_TTL = timedelta(hours=24)


def utcnow() -> datetime:
    return datetime.now(UTC)


def _upsert(s: Session, row_type: type, values: dict[str, Any], keys: list[str], update: dict[str, Any]) -> None:
    """INSERT ... ON CONFLICT DO UPDATE in one statement: concurrent writers (Postgres) lose nothing."""
    insert = postgresql.insert if s.get_bind().dialect.name == "postgresql" else sqlite.insert
    s.execute(insert(row_type).values(**values).on_conflict_do_update(index_elements=keys, set_=update))


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


# --- API keys ---------------------------------------------------------------------------


def create_api_key(db: Database, name: str) -> tuple[str, str]:
    """Create a key; return (key_id, key). The key is shown once and stored only hashed."""
    key = "e2b_" + secrets.token_hex(20)
    key_id = "key_" + secrets.token_hex(6)
    with db.session() as s:
        s.add(ApiKeyRow(key_id=key_id, name=name, key_hash=hash_secret(key), prefix=key[:8], created_at=utcnow()))
    return key_id, key


def list_api_keys(db: Database) -> list[ApiKeyRow]:
    with db.session() as s:
        return list(s.scalars(select(ApiKeyRow).order_by(ApiKeyRow.created_at)))


def revoke_api_key(db: Database, key_id: str) -> bool:
    with db.session() as s:
        row = s.get(ApiKeyRow, key_id)
        if row is None or row.revoked_at is not None:
            return False
        row.revoked_at = utcnow()
        return True


def find_api_key(db: Database, key: str) -> str | None:
    """The id of the live key matching ``key`` (looked up by hash), else None."""
    with db.session() as s:
        row = s.scalar(select(ApiKeyRow).where(ApiKeyRow.key_hash == hash_secret(key)))
        if row is None or row.revoked_at is not None:
            return None
        return row.key_id


# --- sandboxes --------------------------------------------------------------------------


# The writes of every create and kill are plain INSERTs and UPDATEs of the tables (cached statements,
# no unit of work): the ORM's flush of the same rows cost e2b-sandbox ~1 ms more CPU per create+kill.
_SANDBOX_TABLE = cast(Table, SandboxRow.__table__)
_SANDBOX_COLUMNS = {attr.key: attr.columns[0].name for attr in SandboxRow.__mapper__.column_attrs}
_INSERT_SANDBOX = insert(_SANDBOX_TABLE)
_UPDATE_SANDBOX = update(_SANDBOX_TABLE).where(_SANDBOX_TABLE.c.sandbox_id == bindparam("_sandbox_id"))


def add_sandbox(
    db: Database, row: SandboxRow, outbox: Sequence[dict[str, Any]] = (), audit: AuditEntry | None = None
) -> None:
    """Insert the sandbox, and the events that report it (``outbox``) and its audit row in the same
    transaction (one commit per create: each is a round trip, and on SQLite a WAL write). ``row``
    stays the caller's (not attached to a session)."""
    # unset fields (None) are left out, so that the columns' defaults apply as with the ORM's insert
    values = {column: value for key, column in _SANDBOX_COLUMNS.items() if (value := getattr(row, key)) is not None}
    with db.session() as s:
        s.connection().execute(_INSERT_SANDBOX, values)
        _add_outbox(s, outbox)
        _add_audit(s, audit)
        s.connection().execute(
            _count_template_use(s), {"name": row.template_id, "layers": [], "first_used_at": utcnow()}
        )


@functools.cache
def _template_use_upsert(dialect: str) -> Any:
    # Built once per dialect: building and caching-keying the statement cost more than running it.
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    values: dict[str, Any] = {name: bindparam(name) for name in ("name", "layers", "first_used_at")}
    return (
        insert(TemplateRow)
        .values(**values, sandboxes_created=1)
        .on_conflict_do_update(index_elements=["name"], set_={"sandboxes_created": TemplateRow.sandboxes_created + 1})
    )


def _count_template_use(s: Session) -> Any:
    """INSERT ... ON CONFLICT DO UPDATE (as ``_upsert``) counting a create of a template."""
    return _template_use_upsert(s.get_bind().dialect.name)


def get_sandbox(db: Database, sandbox_id: str) -> SandboxRow | None:
    with db.session() as s:
        return s.get(SandboxRow, sandbox_id)


# "Live" as the states it is, not "!= killed": an index search, where a not-equal scans every
# killed row ever kept (6 ms a count at 100k rows, several counts per create).
LIVE_STATES = ("running", "paused")


def _live() -> Any:
    return SandboxRow.state.in_(LIVE_STATES)


def live_sandboxes(db: Database) -> list[SandboxRow]:
    with db.session() as s:
        return list(s.scalars(select(SandboxRow).where(_live()).order_by(SandboxRow.started_at)))


_LIVE_TOTALS = (
    select(func.count(), func.coalesce(func.sum(_SANDBOX_TABLE.c.memory_mb), 0))
    .select_from(_SANDBOX_TABLE)
    .where(_SANDBOX_TABLE.c.state.in_(LIVE_STATES))
)


def live_totals(db: Database) -> tuple[int, int]:
    """(live sandboxes, their memory in MB) in one query: what a create counts against its limits.
    On the connection (no ORM around a query of two numbers: 0.5 -> 0.2 ms of CPU, once per create)."""
    with db.session() as s:
        count, memory_mb = s.connection().execute(_LIVE_TOTALS).one()
        return int(count or 0), int(memory_mb or 0)


def update_sandbox(
    db: Database,
    sandbox_id: str,
    *,
    outbox: Sequence[dict[str, Any]] = (),
    audit: AuditEntry | None = None,
    **changes: Any,
) -> SandboxRow | None:
    """Apply ``changes``; the events that report them (``outbox``) and the audit row commit with
    them or not at all. The row as it is then (None: no such sandbox)."""
    with db.session() as s:
        if not _update_sandbox(s, sandbox_id, changes, outbox, audit):
            return None
        return s.get(SandboxRow, sandbox_id)


def set_sandbox(
    db: Database,
    sandbox_id: str,
    *,
    outbox: Sequence[dict[str, Any]] = (),
    audit: AuditEntry | None = None,
    **changes: Any,
) -> bool:
    """``update_sandbox`` for a caller that needs no row back (a kill): one UPDATE and the inserts,
    no read. False: no such sandbox (nothing written)."""
    with db.session() as s:
        return _update_sandbox(s, sandbox_id, changes, outbox, audit)


def _update_sandbox(
    s: Session,
    sandbox_id: str,
    changes: dict[str, Any],
    outbox: Sequence[dict[str, Any]],
    audit: AuditEntry | None,
) -> bool:
    values = {_SANDBOX_COLUMNS[name]: value for name, value in changes.items()}  # KeyError: not a field
    if values and not s.connection().execute(_UPDATE_SANDBOX, {"_sandbox_id": sandbox_id, **values}).rowcount:
        return False
    if not values and s.get(SandboxRow, sandbox_id) is None:
        return False
    _add_outbox(s, outbox)
    _add_audit(s, audit)
    return True


# --- event outbox (sent to NATS by events/outbox.py) ------------------------------------


_OUTBOX_TABLE = cast(Table, OutboxRow.__table__)
_INSERT_OUTBOX = insert(_OUTBOX_TABLE)


def _add_outbox(s: Session, events: Sequence[dict[str, Any]]) -> None:
    # one row at a time, in order: ``seq`` (autoincrement) is the order they are sent in
    for event in events:
        s.connection().execute(
            _INSERT_OUTBOX,
            {"event_id": str(event["id"]), "topic": str(event["topic"]), "event": event, "created_at": utcnow()},
        )


def add_outbox(db: Database, events: Sequence[dict[str, Any]]) -> None:
    """Events with no state change of their own (a create that failed before its row existed)."""
    with db.session() as s:
        _add_outbox(s, events)


_PENDING_OUTBOX = (
    select(_OUTBOX_TABLE.c.seq, _OUTBOX_TABLE.c.event).order_by(_OUTBOX_TABLE.c.seq).limit(bindparam("limit"))
)


def pending_outbox(db: Database, limit: int) -> list[tuple[int, dict[str, Any]]]:
    """The oldest ``limit`` unsent events as (seq, envelope), in the order they were committed."""
    with db.session() as s:
        rows = s.connection().execute(_PENDING_OUTBOX, {"limit": limit})
        return [(int(seq), event) for seq, event in rows]


_DELETE_OUTBOX_ROW = delete(_OUTBOX_TABLE).where(_OUTBOX_TABLE.c.seq == bindparam("seq"))


def delete_outbox(db: Database, seqs: Sequence[int]) -> None:
    # One cached statement run for each seq (executemany): an IN list is compiled anew for every length.
    if not seqs:
        return
    with db.session() as s:
        s.execute(_DELETE_OUTBOX_ROW, [{"seq": seq} for seq in seqs])


# --- audit and idempotency --------------------------------------------------------------


@dataclass(frozen=True)
class AuditEntry:
    """An audit row to write with a state change (``add_sandbox``, ``update_sandbox``)."""

    actor: str
    action: str
    sandbox_id: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


_INSERT_AUDIT = insert(cast(Table, AuditEventRow.__table__))


def _add_audit(s: Session, entry: AuditEntry | None) -> None:
    if entry is not None:
        s.connection().execute(
            _INSERT_AUDIT,
            {"ts": utcnow(), "actor": entry.actor, "action": entry.action, "sandbox_id": entry.sandbox_id,
             "detail": entry.detail},
        )  # fmt: skip


def audit(db: Database, actor: str, action: str, sandbox_id: str | None = None, **detail: Any) -> None:
    with db.session() as s:
        _add_audit(s, AuditEntry(actor, action, sandbox_id, detail))


def audit_events(db: Database, sandbox_id: str | None = None) -> Sequence[AuditEventRow]:
    with db.session() as s:
        query = select(AuditEventRow).order_by(AuditEventRow.event_id)
        if sandbox_id is not None:
            query = query.where(AuditEventRow.sandbox_id == sandbox_id)
        return list(s.scalars(query))


def get_idempotent(db: Database, api_key_id: str, key: str) -> IdempotencyRow | None:
    with db.session() as s:
        s.execute(delete(IdempotencyRow).where(IdempotencyRow.created_at < utcnow() - IDEMPOTENCY_TTL))
        return s.get(IdempotencyRow, (api_key_id, key))


def put_idempotent(db: Database, api_key_id: str, key: str, request_hash: str, status_code: int, response: str) -> None:
    with db.session() as s:
        fields = dict(request_hash=request_hash, status_code=status_code, response=response, created_at=utcnow())
        _upsert(
            s, IdempotencyRow, dict(api_key_id=api_key_id, key=key, **fields), keys=["api_key_id", "key"], update=fields
        )
