"""Alembic environment: run with the connection handed over by ``store.db.migrate``."""

from alembic import context

from pmoves_e2b.store.models import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
