"""Store fixtures: a private, throwaway PostgreSQL server, and databases on both backends.

``postgres_server`` (session scope) -> ``PostgresServer``
    ``initdb`` + ``pg_ctl start`` of Debian's server binaries into a temp dir owned by the
    ``postgres`` user (the server refuses to run as root), listening on 127.0.0.1 on a free port,
    its unix socket in the temp dir. Creates a login role with a random password. Stopped and
    deleted at the end; teardown fails if a server process is left. Skips only when the server
    binaries are missing (``make sysdeps`` installs them). ``stop()`` / ``start()`` restart it on
    the same port (for outage tests); ``admin()`` is a superuser connection over the socket.
``postgres_url`` (function scope) -> ``str``
    SQLAlchemy URL of a fresh, empty database on that server, owned by the login role (TCP +
    password, like Supabase); dropped at test end.
``db_url`` (function scope, parametrized ``sqlite`` / ``postgres``) -> ``str``
    A fresh, empty database on either backend.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from stack.harness import free_ports, processes_of

PG_LIB = Path("/usr/lib/postgresql")
# Not UTC on purpose: timestamps must come back right whatever zone the server answers in.
SERVER_TIMEZONE = "Asia/Kolkata"


def server_bin_dir() -> Path | None:
    """The newest installed server's bin dir (Debian keeps one per major version)."""
    found = [d / "bin" for d in PG_LIB.glob("*") if (d / "bin" / "initdb").exists() and (d / "bin" / "pg_ctl").exists()]
    return max(found, key=lambda d: int(d.parent.name)) if found else None


@dataclass
class PostgresServer:
    bin_dir: Path
    root: Path
    port: int
    user: str
    password: str
    owner: pwd.struct_passwd | None

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def admin(self) -> psycopg.Connection:
        """Superuser connection over the private unix socket (trust auth is local-only)."""
        return psycopg.connect(
            host=str(self.socket_dir), port=self.port, user="postgres", dbname="postgres", autocommit=True
        )

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        options = " ".join(
            [
                "-c listen_addresses=127.0.0.1",
                f"-c port={self.port}",
                f"-c unix_socket_directories={self.socket_dir}",
                f"-c timezone={SERVER_TIMEZONE}",
                # A throwaway cluster: durability only costs time here.
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
            ]
        )
        _run_as_owner(
            [
                str(self.bin_dir / "pg_ctl"),
                "start",
                "-D",
                str(self.data_dir),
                "-w",
                "-t",
                "60",
                "-l",
                str(self.root / "server.log"),
                "-o",
                options,
            ],
            self.owner,
            timeout=90,
        )

    def stop(self) -> None:
        _run_as_owner(
            [str(self.bin_dir / "pg_ctl"), "stop", "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "60"],
            self.owner,
            timeout=90,
        )


def _run_as_owner(args: list[str], owner: pwd.struct_passwd | None, timeout: float) -> None:
    as_owner = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []} if owner else {}
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": owner.pw_dir if owner else os.environ.get("HOME", "/")}
    result = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL, cwd="/", **as_owner
    )  # type: ignore[arg-type]
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bin_dir = server_bin_dir()
    if bin_dir is None:
        pytest.skip(
            f"PostgreSQL server binaries not found under {PG_LIB}/*/bin "
            "(apt-get install postgresql; `make sysdeps` installs it)"
        )
    # The server refuses to run as root: as root it runs as the `postgres` user Debian's package creates.
    owner = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="pmoves-e2b-pg-"))
    (root / "sock").mkdir()
    if owner:
        for path in (root, root / "sock"):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    os.chmod(root, 0o700)
    server = PostgresServer(bin_dir, root, port=0, user="e2b_test", password=secrets.token_hex(16), owner=owner)
    try:
        _run_as_owner(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(server.data_dir),
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
                "--no-instructions",
            ],
            owner,
            timeout=120,
        )
        server.port = free_ports(1)[0]
        server.start()
        with server.admin() as conn:
            conn.execute(f"CREATE ROLE {server.user} LOGIN CREATEDB PASSWORD '{server.password}'")
        yield server
    finally:
        if (server.data_dir / "postmaster.pid").exists():
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):  # leftovers are checked below
                server.stop()
        leftovers = processes_of(root)  # every server process has its cwd in the data dir
        for pid in leftovers:
            os.kill(pid, 9)
        shutil.rmtree(root, ignore_errors=True)
        assert not leftovers, f"postgres processes left after pg_ctl stop: {leftovers}"


@pytest.fixture()
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    name = "e2b_" + secrets.token_hex(6)
    with postgres_server.admin() as conn:
        conn.execute(f"CREATE DATABASE {name} OWNER {postgres_server.user}")
    yield postgres_server.url(name)
    with postgres_server.admin() as conn:
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("postgres_url")
