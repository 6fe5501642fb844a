"""envd running as an unprivileged user: its own commands work, privileged ones fail cleanly."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2b import SandboxException

from envd.conftest import (
    REPO_SRC,
    RunningEnvd,
    free_port,
    make_sandbox,
    stop_envd,
    wait_healthy,
)

# Like a template: the system interpreter, deps on PYTHONPATH (the venv's interpreter may live
# under a root-only home).
SYSTEM_PYTHON = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")


@pytest.fixture(scope="module")
def unprivileged_envd(envd_user: str) -> Iterator[RunningEnvd]:
    if os.geteuid() != 0:
        pytest.skip("needs root to start envd as another user")
    if not SYSTEM_PYTHON.exists():
        pytest.skip(f"{SYSTEM_PYTHON} not installed")
    entry = pwd.getpwnam(envd_user)
    port = free_port()
    site = sysconfig.get_paths()["purelib"]
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": f"{REPO_SRC}:{site}",
        "ENVD_DEFAULT_USER": envd_user,
        "HOME": entry.pw_dir,
    }
    process = subprocess.Popen(
        [str(SYSTEM_PYTHON), "-m", "pmoves_e2b.envd", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        user=entry.pw_uid,
        group=entry.pw_gid,
        extra_groups=[],
        cwd=entry.pw_dir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    running = RunningEnvd(process, port, "", envd_user, env)
    try:
        wait_healthy(running.url, process)
        yield running
    finally:
        stderr = stop_envd(running)
    assert "Traceback" not in stderr, stderr


def test_commands_run_as_the_envd_user(unprivileged_envd: RunningEnvd) -> None:
    sandbox = make_sandbox(unprivileged_envd)
    uid = pwd.getpwnam(unprivileged_envd.user).pw_uid
    assert sandbox.commands.run("id -u").stdout.strip() == str(uid)


def test_switching_to_root_is_permission_denied(unprivileged_envd: RunningEnvd) -> None:
    with pytest.raises(SandboxException, match="(?i)permission.denied"):
        make_sandbox(unprivileged_envd).commands.run("id -u", user="root")


def test_unreadable_paths_are_permission_denied(unprivileged_envd: RunningEnvd) -> None:
    sandbox = make_sandbox(unprivileged_envd)
    with pytest.raises(SandboxException, match="(?i)permission.denied"):
        sandbox.files.list("/root")
    with pytest.raises(SandboxException, match="(?i)permission.denied"):
        sandbox.files.make_dir("/root/forbidden")
    home = pwd.getpwnam(unprivileged_envd.user).pw_dir
    sandbox.files.write(f"{home}/mine.txt", "ok")
    assert sandbox.files.read(f"{home}/mine.txt") == "ok"
