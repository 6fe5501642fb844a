"""Pausing without memory through the stock `e2b` SDK (2.63.0): ``pause(mode="filesystem")`` and
``lifecycle={"on_timeout": {"action": "pause", "mode": "filesystem"}}``.

Such a sandbox keeps only its files: its processes end, it holds no memory, it survives a restart
of the service and `pmoves-e2b down`/`up`, and a resume boots it afresh under the same id and
credentials with its files, env vars and network rules.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from e2b import Sandbox

pytestmark = pytest.mark.stack


def _paused_dir(stack: Any, sandbox_id: str) -> Path:
    return Path(stack.settings_env["E2B_DATA_DIR"]) / "paused" / sandbox_id


def _processes_of(sandbox_id: str) -> list[int]:
    """Host pids whose cgroup path names the sandbox."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if sandbox_id in (entry / "cgroup").read_text():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_pause_to_disk_ends_processes_and_resume_boots_with_files_env_and_token(
    running_stack: Any, sdk_env: dict[str, str]
) -> None:
    sbx = Sandbox.create(timeout=120, envs={"GREETING": "hello from create"})
    try:
        sbx.files.write("/home/user/notes.txt", "kept on disk", metadata={"kept": "yes"})
        sbx.commands.run("sudo sh -c 'echo root file > /etc/kept.conf'")
        sbx.commands.run("sleep 600", background=True)
        assert _processes_of(sbx.sandbox_id)
        boot_before = sbx.files.read("/proc/sys/kernel/random/boot_id").strip()
        assert boot_before != Path("/proc/sys/kernel/random/boot_id").read_text().strip()  # its own, not the host's

        assert sbx.pause(mode="filesystem") is True
        assert not sbx.is_running()
        assert _processes_of(sbx.sandbox_id) == []  # nothing runs, nothing holds memory
        assert _paused_dir(running_stack, sbx.sandbox_id).is_dir()

        resumed = sbx.connect()
        assert resumed.sandbox_id == sbx.sandbox_id and resumed.is_running()
        # the same handle and its access token work again
        assert sbx.files.read("/home/user/notes.txt") == "kept on disk"
        assert sbx.files.get_info("/home/user/notes.txt").metadata == {"kept": "yes"}
        assert sbx.files.read("/etc/kept.conf") == "root file\n"
        assert sbx.commands.run("echo $GREETING").stdout.strip() == "hello from create"
        assert "sleep 600" not in sbx.commands.run("ps -eo args").stdout  # processes started afresh
        assert sbx.files.read("/proc/sys/kernel/random/boot_id").strip() != boot_before  # it booted again
        sbx.files.write("/home/user/after.txt", "after the resume")

        # paused to disk a second time: both generations of changes come back
        assert sbx.pause(mode="filesystem") is True
        sbx.connect()
        assert sbx.files.read("/home/user/notes.txt") == "kept on disk"
        assert sbx.files.read("/home/user/after.txt") == "after the resume"
    finally:
        sbx.kill()
    deadline = time.monotonic() + 20  # killed: its files go too (teardown runs after the answer)
    while _paused_dir(running_stack, sbx.sandbox_id).exists():
        assert time.monotonic() < deadline, "the files of a killed sandbox stayed"
        time.sleep(0.2)


def test_a_sandbox_paused_to_disk_survives_a_kill_of_the_service(running_stack: Any, sdk_env: dict[str, str]) -> None:
    sbx = Sandbox.create(timeout=120)
    try:
        sbx.files.write("/home/user/state.txt", "before the crash")
        sbx.pause(mode="filesystem")
        old_pid = running_stack.service_pid("sandbox")
        os.kill(old_pid, signal.SIGKILL)
        running_stack.wait_healthy("sandbox", timeout=60)
        assert running_stack.service_pid("sandbox") != old_pid
        assert Sandbox.get_info(sbx.sandbox_id).state.value == "paused"
        again = Sandbox.connect(sbx.sandbox_id)
        assert again.files.read("/home/user/state.txt") == "before the crash"
    finally:
        Sandbox.kill(sbx.sandbox_id)


def test_timeout_pauses_to_disk_when_asked(running_stack: Any, sdk_env: dict[str, str]) -> None:
    sbx = Sandbox.create(timeout=3, lifecycle={"on_timeout": {"action": "pause", "mode": "filesystem"}})
    try:
        sbx.files.write("/home/user/auto.txt", "auto-paused")
        deadline = time.monotonic() + 30
        while Sandbox.get_info(sbx.sandbox_id).state.value != "paused":
            assert time.monotonic() < deadline, "the timeout did not pause the sandbox"
            time.sleep(0.5)
        assert _processes_of(sbx.sandbox_id) == []
        assert _paused_dir(running_stack, sbx.sandbox_id).is_dir()
        sbx.connect(timeout=60)
        assert sbx.files.read("/home/user/auto.txt") == "auto-paused"
        assert Sandbox.get_info(sbx.sandbox_id).state.value == "running"
    finally:
        sbx.kill()


def test_down_and_up_keep_a_sandbox_paused_to_disk(stack_factory: Any) -> None:
    stack = stack_factory(extra_env={"E2B_POOL_SIZE": "0"})
    with pytest.MonkeyPatch.context() as patch:
        for name, value in stack.sdk_env.items():
            patch.setenv(name, value)
        sbx = Sandbox.create(timeout=120)
        running = Sandbox.create(timeout=120)
        sbx.files.write("/home/user/kept.txt", "across down and up")
        sbx.pause(mode="filesystem")
        stack.down()
        stack.up()
        assert Sandbox.get_info(sbx.sandbox_id).state.value == "paused"
        assert running.sandbox_id not in {s.sandbox_id for s in Sandbox.list().next_items()}  # down ends the others
        sbx.connect(timeout=60)
        assert sbx.files.read("/home/user/kept.txt") == "across down and up"
        sbx.kill()
