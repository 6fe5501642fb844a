"""commands.* and pty.* through the stock e2b SDK against a real envd."""

from __future__ import annotations

import os
import time

import pytest
from e2b import CommandExitException, NotFoundException, Sandbox, TimeoutException
from e2b.sandbox.commands.command_handle import PtySize

from envd.conftest import RunningEnvd, make_sandbox, stop_envd


def test_run_returns_stdout_stderr_and_exit_code(sandbox: Sandbox) -> None:
    result = sandbox.commands.run("echo out; echo err >&2")
    assert (result.stdout, result.stderr, result.exit_code) == ("out\n", "err\n", 0)


def test_nonzero_exit_raises_with_code_and_output(sandbox: Sandbox) -> None:
    with pytest.raises(CommandExitException) as info:
        sandbox.commands.run("echo partial; exit 3")
    assert info.value.exit_code == 3
    assert info.value.stdout == "partial\n"


def test_default_user_home_and_identity(sandbox: Sandbox, envd: RunningEnvd, home: str) -> None:
    result = sandbox.commands.run("whoami; pwd; echo $HOME $USER $LOGNAME")
    assert result.stdout.split("\n")[:3] == [envd.user, home, f"{home} {envd.user} {envd.user}"]


def test_user_root_runs_as_root(sandbox: Sandbox) -> None:
    assert sandbox.commands.run("id -u", user="root").stdout.strip() == "0"


def test_unknown_user_is_refused(sandbox: Sandbox) -> None:
    with pytest.raises(Exception, match="invalid username"):
        sandbox.commands.run("true", user="no-such-user-here")


def test_envs_and_cwd(sandbox: Sandbox) -> None:
    result = sandbox.commands.run("echo $GREETING; pwd", envs={"GREETING": "hello"}, cwd="/tmp")
    assert result.stdout == "hello\n/tmp\n"


def test_tilde_and_relative_cwd_resolve_under_home(sandbox: Sandbox, home: str) -> None:
    assert sandbox.commands.run("pwd", cwd="~").stdout.strip() == home
    sandbox.commands.run("mkdir -p sub")
    assert sandbox.commands.run("pwd", cwd="sub").stdout.strip() == f"{home}/sub"


def test_missing_cwd_is_invalid_argument(sandbox: Sandbox) -> None:
    with pytest.raises(Exception, match="does not exist"):
        sandbox.commands.run("true", cwd="/no/such/dir")


def test_timeout_kills_the_process(sandbox: Sandbox) -> None:
    with pytest.raises((TimeoutException, CommandExitException)):
        sandbox.commands.run("sleep 37.123", timeout=1)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        # The bracket keeps pgrep from matching its own command line.
        if not sandbox.commands.run("pgrep -f 'sleep [3]7.123' || true").stdout.strip():
            break
        time.sleep(0.05)
    else:
        pytest.fail("process outlived its Connect-Timeout-Ms deadline")


def _gone(sandbox: Sandbox, pattern: str) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if not sandbox.commands.run(f"pgrep -f '{pattern}' || true").stdout.strip():
            return True
        time.sleep(0.05)
    return False


def test_timeout_kills_the_commands_children_too(sandbox: Sandbox) -> None:
    with pytest.raises((TimeoutException, CommandExitException)):
        sandbox.commands.run("sleep 41.123 & sleep 42.123 & wait", timeout=1)
    assert _gone(sandbox, "sleep 4[12].123"), "a child outlived its command's deadline"


def test_kill_takes_the_commands_children_too(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run("sleep 43.123 & sleep 44.123 & wait", background=True)
    assert sandbox.commands.run(
        "for i in $(seq 50); do pgrep -f 'sleep 4[34].123' && break; sleep 0.05; done"
    ).stdout.strip()
    assert sandbox.commands.kill(handle.pid) is True
    assert _gone(sandbox, "sleep 4[34].123"), "a child outlived its command's kill"


def test_background_list_connect_and_kill(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run("echo started; sleep 30", background=True)
    pids = [p.pid for p in sandbox.commands.list()]
    assert handle.pid in pids
    again = sandbox.commands.connect(handle.pid)
    assert again.pid == handle.pid
    assert sandbox.commands.kill(handle.pid) is True
    with pytest.raises(CommandExitException):
        again.wait()
    assert handle.pid not in [p.pid for p in sandbox.commands.list()]
    assert sandbox.commands.kill(handle.pid) is False


def test_background_process_survives_client_disconnect(sandbox: Sandbox, envd: RunningEnvd) -> None:
    handle = sandbox.commands.run("sleep 30", background=True)
    handle.disconnect()
    other = make_sandbox(envd)
    assert handle.pid in [p.pid for p in other.commands.list()]
    other.commands.kill(handle.pid)


def test_connect_streams_new_output_only(sandbox: Sandbox, home: str) -> None:
    marker = f"{home}/printed-first"
    handle = sandbox.commands.run(f"echo first; touch {marker}; read line; echo got:$line", background=True, stdin=True)
    deadline = time.monotonic() + 5
    while not sandbox.files.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.02)
    handle.disconnect()
    reconnected = sandbox.commands.connect(handle.pid)
    sandbox.commands.send_stdin(handle.pid, "x\n")
    assert reconnected.wait().stdout == "got:x\n"


def test_connect_by_unknown_pid_is_not_found(sandbox: Sandbox) -> None:
    with pytest.raises(NotFoundException):
        sandbox.commands.connect(999_999)


def test_stdin_send_and_close(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run("cat", background=True, stdin=True)
    sandbox.commands.send_stdin(handle.pid, "line one\n")
    sandbox.commands.send_stdin(handle.pid, b"line two\n")
    sandbox.commands.close_stdin(handle.pid)
    assert handle.wait().stdout == "line one\nline two\n"


def test_stdin_stream_input(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run("wc -c", background=True, stdin=True)
    sandbox.commands.stream_input(handle.pid, (f"{i}\n" for i in range(100)))
    sandbox.commands.close_stdin(handle.pid)
    assert handle.wait().stdout.strip() == str(sum(len(f"{i}\n") for i in range(100)))


def test_stdin_disabled_gives_eof(sandbox: Sandbox) -> None:
    assert sandbox.commands.run("cat; echo done").stdout == "done\n"


def _wait_for_file(sandbox: Sandbox, path: str) -> str:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if sandbox.files.exists(path):
            content = sandbox.files.read(path)
            if content:
                return content
        time.sleep(0.02)
    raise TimeoutError(path)


def test_pty_create_input_and_resize(sandbox: Sandbox, home: str) -> None:
    output = bytearray()
    handle = sandbox.pty.create(PtySize(rows=24, cols=80), timeout=30)
    sandbox.pty.send_stdin(handle.pid, b"stty size > ~/size1; tty > ~/tty; echo marker-$((6*7))\n")
    assert _wait_for_file(sandbox, f"{home}/size1").strip() == "24 80"
    sandbox.pty.resize(handle.pid, PtySize(rows=40, cols=100))
    sandbox.pty.send_stdin(handle.pid, b"stty size > ~/size2\nexit 0\n")
    result = handle.wait(on_pty=output.extend)
    assert sandbox.files.read(f"{home}/size2").strip() == "40 100"
    assert sandbox.files.read(f"{home}/tty").startswith("/dev/pts/")
    assert "marker-42" in output.decode(errors="replace")
    assert result.exit_code == 0


def test_pty_kill(sandbox: Sandbox) -> None:
    handle = sandbox.pty.create(PtySize(rows=24, cols=80), timeout=30)
    assert sandbox.pty.kill(handle.pid) is True
    with pytest.raises(CommandExitException):
        handle.wait()


def test_list_shows_tags_and_config(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run("sleep 30", background=True, envs={"K": "V"}, cwd="/tmp")
    try:
        info = next(p for p in sandbox.commands.list() if p.pid == handle.pid)
        assert info.cmd == "/bin/bash" and info.args[-1] == "sleep 30"
        assert info.envs == {"K": "V"} and info.cwd == "/tmp"
    finally:
        sandbox.commands.kill(handle.pid)


@pytest.mark.anyio
async def test_async_sdk_runs_commands(async_sandbox) -> None:  # type: ignore[no-untyped-def]
    result = await async_sandbox.commands.run("echo async")
    assert result.stdout == "async\n"
    handle = await async_sandbox.commands.run("sleep 30", background=True)
    assert await async_sandbox.commands.kill(handle.pid) is True


def test_blocked_stdin_write_fails_cleanly_when_the_process_exits(sandbox: Sandbox) -> None:
    # `sleep` never reads stdin: the pipe fills, the write waits, then the process ends.
    handle = sandbox.commands.run("sleep 1", background=True, stdin=True)
    with pytest.raises(Exception):  # noqa: B017 - any clean SDK error; the point is no hang
        sandbox.commands.send_stdin(handle.pid, b"x" * (4 << 20), request_timeout=10)
    assert sandbox.commands.run("echo still-serving").stdout == "still-serving\n"


def test_stopping_envd_kills_its_processes_and_their_children(fresh_envd: RunningEnvd) -> None:
    sandbox = make_sandbox(fresh_envd)
    handle = sandbox.commands.run("sleep 300 & sleep 301", background=True)
    # the shell forks its children a moment after Start answers
    children = sandbox.commands.run(
        f"for i in $(seq 50); do pgrep -P {handle.pid} && break; sleep 0.05; done"
    ).stdout.split()
    assert children
    stop_envd(fresh_envd)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in [handle.pid, *children]):
        time.sleep(0.05)
    assert not [p for p in [handle.pid, *children] if os.path.exists(f"/proc/{p}")]


def test_command_timeout_is_a_timeout_error_every_time(sandbox: Sandbox) -> None:
    """Issue 12 item 7: the stream ends with deadline_exceeded, never a "signal: killed" exit."""
    for _ in range(4):
        with pytest.raises(TimeoutException):
            sandbox.commands.run("sleep 30", timeout=0.5)


@pytest.mark.anyio
async def test_async_command_timeout_is_a_timeout_error_every_time(async_sandbox) -> None:  # type: ignore[no-untyped-def]
    for _ in range(4):
        with pytest.raises(TimeoutException):
            await async_sandbox.commands.run("sleep 30", timeout=0.5)
