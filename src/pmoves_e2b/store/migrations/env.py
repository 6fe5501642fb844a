"""Alembic environment: run with the connection handed over by ``store.db.migrate``.

Batch mode (copy-and-move tables) is only needed for SQLite, which cannot ALTER most things.
"""

from alembic import context

from pmoves_e2b.store.models import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
