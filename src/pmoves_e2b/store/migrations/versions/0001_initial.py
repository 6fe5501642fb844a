"""Initial schema: sandboxes, api keys, templates, audit events, idempotency keys.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "sandboxes",
        sa.Column("sandbox_id", sa.String(64), primary_key=True),
        sa.Column("template_id", sa.String(128), nullable=False, index=True),
        sa.Column("state", sa.String(16), nullable=False, index=True),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("end_at", TS, nullable=False),
        sa.Column("paused_remaining_s", sa.Float, nullable=True),
        sa.Column("cpu_count", sa.Float, nullable=False),
        sa.Column("memory_mb", sa.Integer, nullable=False),
        sa.Column("disk_mb", sa.Integer, nullable=False),
        sa.Column("allow_internet", sa.Boolean, nullable=False),
        sa.Column("auto_pause", sa.Boolean, nullable=False),
        sa.Column("metadata", sa.JSON, nullable=False),
        sa.Column("env_vars", sa.JSON, nullable=False),
        sa.Column("envd_access_token", sa.String(128), nullable=False),
        sa.Column("api_key_id", sa.String(64), nullable=False, index=True),
        sa.Column("handle", sa.JSON, nullable=False),
        sa.Column("killed_at", TS, nullable=True),
        sa.Column("kill_reason", sa.String(64), nullable=True),
    )
    op.create_table(
        "api_keys",
        sa.Column("key_id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True, index=True),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("revoked_at", TS, nullable=True),
        sa.Column("last_used_at", TS, nullable=True),
    )
    op.create_table(
        "templates",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("layers", sa.JSON, nullable=False),
        sa.Column("first_used_at", TS, nullable=False),
        sa.Column("sandboxes_created", sa.Integer, nullable=False),
    )
    op.create_table(
        "audit_events",
        sa.Column("event_id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("ts", TS, nullable=False, index=True),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("sandbox_id", sa.String(64), nullable=True, index=True),
        sa.Column("detail", sa.JSON, nullable=False),
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("api_key_id", sa.String(64), primary_key=True),
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("status_code", sa.Integer, nullable=False),
        sa.Column("response", sa.Text, nullable=False),
        sa.Column("created_at", TS, nullable=False, index=True),
    )


def downgrade() -> None:
    for table in ("idempotency_keys", "audit_events", "templates", "api_keys", "sandboxes"):
        op.drop_table(table)
