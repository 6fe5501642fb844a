"""Queries of custom template builds (synchronous; callers run them off the event loop).

A build is a plain dict of ``TemplateBuildRow``'s columns, timestamps as ISO strings, so the
template code above needs nothing of SQL.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, update

from pmoves_e2b.store.db import Database
from pmoves_e2b.store.models import TemplateBuildRow

_TIMES = ("created_at", "updated_at", "finished_at")
_COLUMNS = ("build_id", "template_id", "status", "tags", "cpu_count", "memory_mb", "reason", "step", "entries", *_TIMES)


def _row_values(build: dict[str, Any]) -> dict[str, Any]:
    values = {k: build[k] for k in _COLUMNS if k in build}
    for key in _TIMES:
        if key in values:
            values[key] = datetime.fromisoformat(values[key]) if values[key] else None
    return values


def _as_dict(row: TemplateBuildRow) -> dict[str, Any]:
    build = {k: getattr(row, k) for k in _COLUMNS}
    for key in _TIMES:
        build[key] = build[key].isoformat() if build[key] else ""
    return build


def save(db: Database, build: dict[str, Any]) -> None:
    """Insert or replace the build."""
    with db.session() as s:
        s.merge(TemplateBuildRow(**_row_values(build)))


def load(db: Database, build_id: str) -> dict[str, Any] | None:
    with db.session() as s:
        row = s.get(TemplateBuildRow, build_id)
        return _as_dict(row) if row is not None else None


def of_template(db: Database, template_id: str) -> list[dict[str, Any]]:
    """Oldest first."""
    with db.session() as s:
        query = select(TemplateBuildRow).where(TemplateBuildRow.template_id == template_id)
        return [_as_dict(r) for r in s.scalars(query.order_by(TemplateBuildRow.created_at))]


def interrupt_unfinished(db: Database, reason: str) -> int:
    """Fail the builds a previous process left waiting or building (their threads are gone)."""
    now = datetime.now(UTC)
    with db.session() as s:
        result = s.execute(
            update(TemplateBuildRow)
            .where(TemplateBuildRow.status.in_(("waiting", "building")))
            .values(status="error", reason=reason, updated_at=now, finished_at=now)
        )
        return int(getattr(result, "rowcount", 0) or 0)
