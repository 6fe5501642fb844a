"""A restarted envd serves its sandbox as before (issue 11 item 3): the template's launcher restarts
an envd that died, and ``ENVD_STATE_FILE`` gives the new one what ``/init`` gave the old one."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from envd.conftest import REPO_SRC, make_sandbox, start_envd, stop_envd

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="envd keeps its state only as root")


def test_a_restarted_envd_keeps_the_token_env_vars_user_and_workdir(envd_user: str, tmp_path: Path) -> None:
    state_file = tmp_path / "pmoves-envd" / "state.json"
    first = start_envd(envd_user, extra_env={"ENVD_STATE_FILE": str(state_file)})
    try:
        body = {"accessToken": "tok-1", "envVars": {"KEPT": "yes"}, "defaultUser": "root", "defaultWorkdir": "/tmp"}
        assert first.init(body).status_code == 204
    finally:
        first.process.kill()  # as the sandbox's OOM would
        first.process.wait(10)
    assert stat.S_IMODE(state_file.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
    second = start_envd(envd_user, port=first.port, extra_env={"ENVD_STATE_FILE": str(state_file)})
    try:
        assert httpx.get(f"{second.url}/envs").status_code == 401  # never open after a restart
        sandbox = make_sandbox(second, token="tok-1")
        assert sandbox.commands.run("echo $KEPT; whoami; pwd").stdout == "yes\nroot\n/tmp\n"
    finally:
        stderr = stop_envd(second)
    assert "restarted" in stderr


def test_a_state_dir_that_is_not_root_only_is_not_used(envd_user: str, tmp_path: Path) -> None:
    planted = tmp_path / "pmoves-envd"  # e.g. made first by a sandbox user in the world-writable /dev/shm
    planted.mkdir(mode=0o777)
    os.chown(planted, 65534, 65534)
    running = start_envd(envd_user, extra_env={"ENVD_STATE_FILE": str(planted / "state.json")})
    try:
        assert running.init({"accessToken": "tok-2"}).status_code == 204
        assert not (planted / "state.json").exists()
    finally:
        stderr = stop_envd(running)
    assert "not a root-only directory" in stderr


def test_an_unreadable_state_ends_envd_instead_of_serving_without_a_token(tmp_path: Path) -> None:
    state_file = tmp_path / "pmoves-envd" / "state.json"
    state_file.parent.mkdir(mode=0o700)
    state_file.write_text("{not json")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_SRC), "ENVD_STATE_FILE": str(state_file)}
    result = subprocess.run(
        [sys.executable, "-m", "pmoves_e2b.envd", "--host", "127.0.0.1", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0 and "not restarting" in result.stderr
