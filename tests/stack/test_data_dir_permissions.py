"""Issue 11 finding 4: the data dir holds every sandbox's access token, init secret and env vars;
a local user other than its owner must not read any of it (database, logs, secrets, TLS key)."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest
from e2b import Sandbox
from stack.harness import RunningStack

pytestmark = pytest.mark.stack

NOBODY = "65534"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _nobody_can_read(path: Path) -> bool:
    reader = ["setpriv", "--reuid", NOBODY, "--regid", NOBODY, "--clear-groups", "cat", str(path)]
    return subprocess.run(reader, capture_output=True, check=False).returncode == 0


def test_a_local_user_reads_nothing_in_the_data_dir(running_stack: RunningStack, sdk_env: dict[str, str]) -> None:
    sandbox = Sandbox.create(envs={"SECRET_OF_A_TENANT": "hunter2"})
    try:
        data = running_stack.data_dir
        assert _mode(data) == 0o700
        for sub in ("logs", "run", "secrets", "tls"):
            assert _mode(data / sub) == 0o700, sub
        database = data / "pmoves-e2b.db"
        private = [
            database,
            *data.glob("pmoves-e2b.db-*"),
            *(data / "logs").glob("*.log"),
            *(data / "secrets").iterdir(),
        ]
        assert len(list((data / "logs").glob("*.log"))) >= 5
        for path in private:
            assert _mode(path) & 0o077 == 0, (path, oct(_mode(path)))
        for path in (database, data / "logs" / "sandbox.log", data / "secrets" / "E2B_API_KEY"):
            assert path.exists()
            assert not _nobody_can_read(path), path
    finally:
        sandbox.kill()


def test_a_local_user_cannot_read_a_sandbox_filesystem_from_the_host(
    running_stack: RunningStack, sdk_env: dict[str, str]
) -> None:
    """A sandbox's root is mounted on the host under /run/pmoves-e2b/roots/…/<id>/m, a path `ps`
    shows every local user (bwrap's command line); what is world-readable inside must not be
    readable there by another host user."""
    sandbox = Sandbox.create()
    try:
        sandbox.files.write("/home/user/notes.txt", "tenant data")
        roots = list(Path("/run/pmoves-e2b/roots").glob(f"*/{sandbox.sandbox_id}/m"))
        assert len(roots) == 1, roots
        inside = roots[0] / "home/user/notes.txt"
        assert inside.read_text() == "tenant data"  # the host's root (the service) still can
        assert not _nobody_can_read(inside)
        assert sandbox.commands.run("cat /home/user/notes.txt").stdout == "tenant data"
    finally:
        sandbox.kill()
