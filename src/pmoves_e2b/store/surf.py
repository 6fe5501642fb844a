"""Queries of e2b-surf: sessions, their steps and pages (synchronous; callers run them off the event loop)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, update

from pmoves_e2b.store.db import Database
from pmoves_e2b.store.models import SurfPageRow, SurfSessionRow, SurfStepRow

LIVE_STATES = ("queued", "running")


def utcnow() -> datetime:
    return datetime.now(UTC)


def add_session(db: Database, row: SurfSessionRow) -> None:
    with db.session() as s:
        s.add(row)


def get_session(db: Database, session_id: str) -> SurfSessionRow | None:
    with db.session() as s:
        return s.get(SurfSessionRow, session_id)


def list_sessions(db: Database, limit: int = 100, state: str | None = None) -> list[SurfSessionRow]:
    """Newest first."""
    with db.session() as s:
        query = select(SurfSessionRow).order_by(SurfSessionRow.created_at.desc()).limit(limit)
        if state is not None:
            query = query.where(SurfSessionRow.state == state)
        return list(s.scalars(query))


def update_session(db: Database, session_id: str, **changes: Any) -> SurfSessionRow | None:
    with db.session() as s:
        row = s.get(SurfSessionRow, session_id)
        if row is None:
            return None
        for name, value in changes.items():
            setattr(row, name, value)
        return row


def interrupt_live_sessions(db: Database) -> list[SurfSessionRow]:
    """Mark the sessions a previous process left queued or running as interrupted; answer them."""
    now = utcnow()
    with db.session() as s:
        rows = list(s.scalars(select(SurfSessionRow).where(SurfSessionRow.state.in_(LIVE_STATES))))
        if rows:
            s.execute(
                update(SurfSessionRow)
                .where(SurfSessionRow.session_id.in_([r.session_id for r in rows]))
                .values(
                    state="interrupted",
                    ended_at=now,
                    error={"code": "interrupted", "message": "e2b-surf restarted while this session ran"},
                )
            )
        return rows


def _append(
    db: Database, row_type: type[SurfStepRow] | type[SurfPageRow], session_id: str, **fields: Any
) -> tuple[int, datetime]:
    """Add the session's next step or page (indexes 0, 1, … in order); answers its index and time."""
    now = utcnow()
    with db.session() as s:
        count = select(func.count()).select_from(row_type).where(row_type.session_id == session_id)
        index = s.scalar(count) or 0
        s.add(row_type(session_id=session_id, index=index, ts=now, **fields))
    return index, now


def add_step(db: Database, session_id: str, kind: str, data: dict[str, Any]) -> tuple[int, datetime]:
    return _append(db, SurfStepRow, session_id, kind=kind, data=data)


def steps(db: Database, session_id: str) -> list[SurfStepRow]:
    with db.session() as s:
        query = select(SurfStepRow).where(SurfStepRow.session_id == session_id).order_by(SurfStepRow.index)
        return list(s.scalars(query))


def add_page(db: Database, session_id: str, url: str, data: dict[str, Any]) -> tuple[int, datetime]:
    return _append(db, SurfPageRow, session_id, url=url, data=data)


def pages(db: Database, session_id: str) -> list[SurfPageRow]:
    with db.session() as s:
        query = select(SurfPageRow).where(SurfPageRow.session_id == session_id).order_by(SurfPageRow.index)
        return list(s.scalars(query))
