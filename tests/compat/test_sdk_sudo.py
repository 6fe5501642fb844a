"""Passwordless sudo for `user` inside a sandbox (no_new_privs on), with the stock `e2b` SDK."""

from __future__ import annotations

import time

import pytest
from e2b import CommandExitException, PtySize, Sandbox

pytestmark = pytest.mark.stack


@pytest.fixture()
def sbx(sdk_env: dict[str, str]) -> Sandbox:  # type: ignore[misc]
    box = Sandbox.create(timeout=300)
    yield box
    box.kill()


def test_agents_sudo_commands(sbx: Sandbox) -> None:
    result = sbx.commands.run(
        "sudo -n true && sudo whoami && echo x | sudo tee /etc/sudo-test && sudo apt-get --version | head -1"
        " && sudo -u user whoami && sudo sh -c 'id -u > /root/owned' && sudo cat /root/owned"
        " && sudo -E env | grep -c ^SUDO_USER=user && echo 'id -un' | sudo -i && sudo -s pwd"
    )
    lines = result.stdout.splitlines()
    assert lines[:2] == ["root", "x"]
    assert lines[2].startswith("apt ")
    assert lines[3:] == ["user", "0", "1", "root", "/home/user"]
    assert sbx.files.read("/etc/sudo-test") == "x\n"
    with pytest.raises(CommandExitException) as failed:
        sbx.commands.run("sudo sh -c 'exit 5'")
    assert failed.value.exit_code == 5


def test_only_sudoers_may_sudo(sbx: Sandbox) -> None:
    with pytest.raises(CommandExitException) as refused:
        sbx.commands.run("sudo -u nobody sudo -n touch /etc/nope")
    assert refused.value.exit_code == 1
    assert "nobody is not in the sudoers file" in refused.value.stderr
    assert sbx.commands.run("test -e /etc/nope || echo absent").stdout == "absent\n"


def test_sudo_in_a_pty_and_killing_it(sbx: Sandbox) -> None:
    chunks: list[bytes] = []
    pty = sbx.pty.create(PtySize(rows=24, cols=80))
    sbx.pty.send_stdin(pty.pid, b"sudo id -un; sudo test -t 0 && echo tty-kept; exit\n")
    pty.wait(on_pty=chunks.append)
    output = b"".join(chunks)
    assert b"root" in output and b"tty-kept" in output

    handle = sbx.commands.run("sudo sleep 300", background=True)
    deadline = time.monotonic() + 10
    while "sleep 300" not in sbx.commands.run("ps -eo args", user="root").stdout:
        assert time.monotonic() < deadline, "sudo sleep did not start"
        time.sleep(0.1)
    assert sbx.commands.kill(handle.pid) is True
    while "sleep 300" in sbx.commands.run("ps -eo args", user="root").stdout:
        assert time.monotonic() < deadline + 10, "the sudo'd command outlived the killed sudo"
        time.sleep(0.1)
