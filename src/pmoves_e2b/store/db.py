"""Engine, sessions and migrations. The only module besides models that speaks SQL."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import URL, Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker

from pmoves_e2b.private_files import make_private

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Any constant works: it only has to be the same in every process migrating one Postgres database.
MIGRATION_LOCK_ID = 0x6532625F6D6967  # "e2b_mig"
# Alembic's command API keeps its context in module globals: one migration per process at a time.
_migration_lock = threading.Lock()


def database_url(url: str) -> URL:
    """Parse ``url``; plain ``postgres://`` / ``postgresql://`` (as Supabase prints them) use psycopg 3."""
    parsed = make_url(url)
    if parsed.drivername in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def make_engine(url: str | URL) -> Engine:
    url = database_url(url) if isinstance(url, str) else url
    if url.get_backend_name() == "sqlite":
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            # WAL lets the CLI read while the service writes; NORMAL sync is safe with WAL.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    # pre_ping survives a restarted server or a pooler closing idle connections (Supabase);
    # connect_timeout keeps the health check from hanging on an unreachable host; no server-side
    # prepared statements, which transaction-mode poolers (Supabase port 6543) cannot keep.
    return create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 10, "prepare_threshold": None})


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (idempotent)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with _migration_lock, engine.begin() as conn:
        # Processes starting together on one empty database must not both create the tables:
        # take the database's lock before alembic reads the schema version.
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_ID})")
        elif conn.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


class Database:
    def __init__(self, url: str) -> None:
        parsed = database_url(url)
        if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        self.engine = make_engine(parsed)
        migrate(self.engine)
        if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
            # it holds sandboxes' access tokens and init secrets (SQLite gives -wal/-shm the db's mode)
            database = Path(parsed.database)
            make_private(database, Path(f"{database}-wal"), Path(f"{database}-shm"))
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    def ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
            return True
        except Exception:  # noqa: BLE001 - health check reports, never raises
            return False

    def close(self) -> None:
        self.engine.dispose()
