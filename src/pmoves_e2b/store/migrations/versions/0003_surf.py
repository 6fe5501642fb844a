"""e2b-surf: sessions, their steps and pages.

Revision ID: 0003
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0001"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "surf_sessions",
        sa.Column("session_id", sa.String(64), primary_key=True),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False, index=True),
        sa.Column("request", sa.JSON, nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("created_at", TS, nullable=False, index=True),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("ended_at", TS, nullable=True),
        sa.Column("desktop_id", sa.String(64), nullable=True),
        sa.Column("result", sa.JSON, nullable=True),
        sa.Column("error", sa.JSON, nullable=True),
    )
    op.create_table(
        "surf_steps",
        sa.Column("session_id", sa.String(64), primary_key=True),
        sa.Column("index", sa.Integer, primary_key=True),
        sa.Column("ts", TS, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("data", sa.JSON, nullable=False),
    )
    op.create_table(
        "surf_pages",
        sa.Column("session_id", sa.String(64), primary_key=True),
        sa.Column("index", sa.Integer, primary_key=True),
        sa.Column("ts", TS, nullable=False),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("data", sa.JSON, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("surf_pages")
    op.drop_table("surf_steps")
    op.drop_table("surf_sessions")
