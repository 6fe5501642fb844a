"""Commands, PTY, files and watch through our proxy, with the stock `e2b` SDK."""

from __future__ import annotations

import asyncio
import time

import pytest
from e2b import (
    AsyncSandbox,
    CommandExitException,
    CommandHandle,
    FilesystemEventType,
    InvalidArgumentException,
    Sandbox,
)

pytestmark = pytest.mark.stack


def test_commands_stdout_stderr_exit_codes_and_root(sbx: Sandbox) -> None:
    out = sbx.commands.run("echo out; echo err >&2")
    assert (out.stdout, out.stderr, out.exit_code) == ("out\n", "err\n", 0)
    with pytest.raises(CommandExitException) as failed:
        sbx.commands.run("exit 3")
    assert failed.value.exit_code == 3
    assert sbx.commands.run("id -u", user="root").stdout.strip() == "0"
    assert sbx.commands.run("id -u").stdout.strip() == "1000"
    assert sbx.commands.run("pwd", cwd="/tmp").stdout.strip() == "/tmp"


def test_a_command_runs_with_the_users_whole_identity_read_when_it_starts(sbx: Sandbox) -> None:
    """uid and gid real, effective, saved and filesystem; the supplementary groups of /etc/group as they
    are when the command starts (a group given to the user a moment ago counts); a missing program is
    exit 127 with the shell's message, as user and as root."""
    sbx.commands.run("groupadd -f -g 2345 builders && usermod -a -G builders user", user="root")
    try:
        status = sbx.commands.run("grep -E '^(Uid|Gid|Groups):' /proc/self/status").stdout.splitlines()
        assert status[0].split() == ["Uid:", "1000", "1000", "1000", "1000"]
        assert status[1].split() == ["Gid:", "1000", "1000", "1000", "1000"]
        expected = sbx.commands.run("id -G user", user="root").stdout.split()
        assert "2345" in expected
        assert sorted(status[2].split()[1:]) == sorted(expected)
        assert sbx.commands.run("id -Gn").stdout.split() == sbx.commands.run("id -Gn user", user="root").stdout.split()
    finally:
        sbx.commands.run("gpasswd -d user builders >/dev/null; groupdel builders", user="root")
    for user in ("user", "root"):
        with pytest.raises(CommandExitException) as missing:
            sbx.commands.run("no-such-program-here", user=user)
        assert missing.value.exit_code == 127
        assert "no-such-program-here: command not found" in missing.value.stderr


def test_a_command_starts_with_only_its_stdio_in_its_own_session_and_default_signals(sbx: Sandbox) -> None:
    """No fd of envd's leaks into a command, it leads its own session and process group, and it
    starts with the default signal handling (a pipe's writer dies of SIGPIPE, which envd ignores),
    as user and as root."""
    for user in ("user", "root"):
        fds = sbx.commands.run(
            "exec python3 -c 'import os; print(sorted(int(fd) for fd in os.listdir(\"/proc/self/fd\")))'", user=user
        )
        assert fds.stdout.strip() == "[0, 1, 2, 3]"  # 3: the listing's own
        session = sbx.commands.run("ps -o pid=,pgid=,sid= -p $$", user=user).stdout.split()
        assert len(set(session)) == 1, session
        term = sbx.commands.run("sleep 30 & kill -TERM $!; wait $!; echo $?", user=user, timeout=20)
        assert term.stdout.strip() == "143"  # SIGTERM neither blocked nor ignored
        assert sbx.commands.run("yes | head -c 1 >/dev/null; echo ${PIPESTATUS[0]}", user=user).stdout.strip() == "141"


def test_a_command_that_cannot_be_passed_intact_is_refused(sbx: Sandbox) -> None:
    """A NUL byte (C would cut the string there) or an env name with '=' is a clear error, not a
    command run with something else."""
    for command, envs in (("true", {"A=B": "x"}), ("true", {"A": "x\0y"}), ("echo a\0b", {})):
        with pytest.raises(InvalidArgumentException):
            sbx.commands.run(command, envs=envs)
    assert sbx.commands.run("echo ok", envs={"A": "x=y"}).stdout == "ok\n"


def test_commands_ending_at_once_each_report_their_own_exit(sbx: Sandbox) -> None:
    """Exits that come together (one SIGCHLD may stand for several) are each told to their stream."""
    handles = [sbx.commands.run(f"sleep 0.5; exit {code}", background=True) for code in range(12)]

    def exit_code(handle: CommandHandle) -> int:
        try:
            return handle.wait().exit_code
        except CommandExitException as exc:
            return exc.exit_code

    assert [exit_code(handle) for handle in handles] == list(range(12))


def test_background_command_list_and_kill(sbx: Sandbox) -> None:
    handle = sbx.commands.run("sleep 300", background=True)
    assert handle.pid in {p.pid for p in sbx.commands.list()}
    assert sbx.commands.kill(handle.pid) is True
    # SIGKILL is delivered at once; envd drops the process from its list when it has reaped it.
    deadline = time.monotonic() + 10
    while handle.pid in {p.pid for p in sbx.commands.list()} and time.monotonic() < deadline:
        time.sleep(0.05)
    assert handle.pid not in {p.pid for p in sbx.commands.list()}
    assert sbx.commands.kill(handle.pid) is False


def test_pty_takes_input_and_resizes(sbx: Sandbox) -> None:
    chunks: list[bytes] = []
    from e2b import PtySize

    pty = sbx.pty.create(PtySize(rows=24, cols=80))
    sbx.pty.resize(pty.pid, PtySize(rows=30, cols=100))
    sbx.pty.send_stdin(pty.pid, b"stty size; exit\n")
    pty.wait(on_pty=chunks.append)
    assert b"30 100" in b"".join(chunks)


def _pty_session(sbx: Sandbox, *inputs: bytes) -> bytes:
    """What a PTY shows for these inputs, each sent a second after the one before (the shell is
    busy with the last); the PTY ends within 20 s or the SDK raises its timeout."""
    from e2b import PtySize

    chunks: list[bytes] = []
    pty = sbx.pty.create(PtySize(rows=24, cols=80), timeout=20)
    for number, data in enumerate(inputs):
        if number:
            time.sleep(1)
        sbx.pty.send_stdin(pty.pid, data)
    pty.wait(on_pty=chunks.append)
    return b"".join(chunks)


def test_a_pty_is_the_controlling_terminal_of_its_shell(sbx: Sandbox) -> None:
    """Job control: each job the shell starts is the terminal's foreground process group."""
    check = b"python3 -c 'import os; print(\"fg\", os.tcgetpgrp(0) == os.getpgrp() != os.getsid(0))'; exit\n"
    output = _pty_session(sbx, check)
    assert b"fg True" in output
    assert b"no job control" not in output


def test_ctrl_c_in_a_pty_ends_the_foreground_job_only(sbx: Sandbox) -> None:
    """On gvisor too, whose terminal has no ISIG: envd sends the SIGINT (envd/process/tty_signals.py)."""
    output = _pty_session(
        sbx,
        b"sleep 100 & sleep 60; echo after\n",
        b"\x03",
        b"echo done:$? background:$(kill -0 $! && echo alive); kill $!; exit\n",
    )
    assert b"done:130" in output and b"after" not in output.replace(b"echo after", b"")
    assert b"background:alive" in output  # ^C is the foreground job's, not the background one's


def test_files_roundtrip_list_and_remove(sbx: Sandbox) -> None:
    sbx.files.write("/home/user/dir/a.txt", "alpha")
    sbx.files.write("/home/user/dir/b.bin", b"\x00\x01\x02")
    assert sbx.files.read("/home/user/dir/a.txt") == "alpha"
    assert sbx.files.read("/home/user/dir/b.bin", format="bytes") == b"\x00\x01\x02"
    names = sorted(e.name for e in sbx.files.list("/home/user/dir"))
    assert names == ["a.txt", "b.bin"]
    assert sbx.commands.run("stat -c %U /home/user/dir/a.txt").stdout.strip() == "user"
    sbx.files.remove("/home/user/dir")
    assert not sbx.files.exists("/home/user/dir/a.txt")
    big = b"x" * (8 << 20)
    sbx.files.write("/tmp/big", big)
    assert sbx.files.read("/tmp/big", format="bytes") == big


def test_file_metadata_follows_the_file_through_envd(sbx: Sandbox) -> None:
    """On every tier, gVisor's root too (its gofer refuses user xattrs, so envd keeps the map)."""
    meta = {"author": "mish", "purpose": "upload"}
    assert sbx.files.write("/home/user/meta/a.txt", "alpha", metadata=meta).metadata == meta
    assert sbx.files.get_info("/home/user/meta/a.txt").metadata == meta
    assert {e.name: e.metadata for e in sbx.files.list("/home/user/meta")} == {"a.txt": meta}
    assert sbx.files.rename("/home/user/meta/a.txt", "/home/user/meta/b.txt").metadata == meta
    assert not sbx.files.exists("/home/user/meta/a.txt")
    sbx.files.write("/home/user/meta/a.txt", "a new file where the old one was")
    assert sbx.files.get_info("/home/user/meta/a.txt").metadata is None
    # a whole directory moved keeps its files' maps
    assert sbx.files.rename("/home/user/meta", "/home/user/moved").path == "/home/user/moved"
    assert sbx.files.get_info("/home/user/moved/b.txt").metadata == meta
    # overwritten without metadata: none; replaced by a program: none either
    sbx.files.write("/home/user/moved/b.txt", "second")
    assert sbx.files.get_info("/home/user/moved/b.txt").metadata is None
    sbx.files.write("/home/user/moved/c.txt", "c", metadata={"Tag": "Upper"})
    assert sbx.files.get_info("/home/user/moved/c.txt").metadata == {"tag": "Upper"}
    sbx.commands.run("rm /home/user/moved/c.txt && echo other > /home/user/moved/c.txt")
    assert sbx.files.get_info("/home/user/moved/c.txt").metadata is None
    # removed with its directory and made again: nothing comes back
    sbx.files.write("/home/user/moved/d.txt", "d", metadata={"k": "v"})
    sbx.files.remove("/home/user/moved")
    sbx.files.write("/home/user/moved/d.txt", "d")
    assert sbx.files.get_info("/home/user/moved/d.txt").metadata is None
    # a program moves a file away and makes another there: the map is not left on the new one
    sbx.files.write("/home/user/moved/e.txt", "e", metadata={"k": "v"})
    sbx.commands.run("mv /home/user/moved/e.txt /home/user/moved/f.txt && echo new > /home/user/moved/e.txt")
    assert sbx.files.get_info("/home/user/moved/e.txt").metadata is None
    sbx.files.remove("/home/user/moved")


def test_a_removed_file_with_metadata_gives_its_space_back(sbx: Sandbox) -> None:
    """envd's metadata store holds nothing of the file (on gVisor a hard link to it would keep a
    removed file's space until the sandbox ends)."""

    def used() -> int:
        return int(sbx.commands.run("df --output=used -B1M /home/user | tail -1").stdout)

    before = used()
    sbx.files.write("/home/user/big.bin", b"\0" * (64 << 20), metadata={"size": "64M"})
    assert used() >= before + 60
    sbx.commands.run("rm /home/user/big.bin")
    deadline = time.monotonic() + 30
    while used() >= before + 30:
        assert time.monotonic() < deadline, "the removed file's space was not given back"
        time.sleep(0.5)


def test_watch_dir_sees_new_files(sbx: Sandbox) -> None:
    sbx.files.make_dir("/home/user/watched")
    handle = sbx.files.watch_dir("/home/user/watched")
    try:
        sbx.files.write("/home/user/watched/new.txt", "x")
        deadline = time.monotonic() + 10
        seen: list = []
        while time.monotonic() < deadline and not any(e.name == "new.txt" for e in seen):
            seen += handle.get_new_events()
            time.sleep(0.1)
        assert any(
            e.name == "new.txt" and e.type in (FilesystemEventType.CREATE, FilesystemEventType.WRITE) for e in seen
        )
    finally:
        handle.stop()


def test_async_watch_dir_recursive(sdk_env: dict[str, str]) -> None:
    async def main() -> list[str]:
        box = await AsyncSandbox.create(timeout=60)
        try:
            await box.files.make_dir("/home/user/w/sub")
            events: list[str] = []
            handle = await box.files.watch_dir("/home/user/w", on_event=lambda e: events.append(e.name), recursive=True)
            await box.files.write("/home/user/w/sub/deep.txt", "x")
            for _ in range(100):
                if any(name.endswith("deep.txt") for name in events):
                    break
                await asyncio.sleep(0.1)
            await handle.stop()
            return events
        finally:
            await box.kill()

    assert any(name.endswith("deep.txt") for name in asyncio.run(main()))


def test_download_and_upload_urls_work_over_plain_http(sbx: Sandbox) -> None:
    import httpx

    sbx.files.write("/home/user/shared.txt", "via url")
    assert httpx.get(sbx.download_url("/home/user/shared.txt"), timeout=10).text == "via url"
    res = httpx.post(sbx.upload_url("/home/user/up.txt"), files={"file": ("up.txt", b"uploaded")}, timeout=10)
    assert res.status_code == 200
    assert sbx.files.read("/home/user/up.txt") == "uploaded"


def test_expired_or_forged_signed_urls_are_401_like_envd(sbx: Sandbox) -> None:
    """Issue 12 item 8: through E2B_SANDBOX_URL an expired signed URL answered 404; envd says 401."""
    import time

    import httpx

    sbx.files.write("/home/user/signed.txt", "secret")
    expired = sbx.download_url("/home/user/signed.txt", use_signature_expiration=1)
    time.sleep(2.5)
    response = httpx.get(expired, timeout=10)
    assert response.status_code == 401 and "signature is already expired" in response.text
    forged = sbx.download_url("/home/user/signed.txt").replace("signature=v1_", "signature=v1_X")
    response = httpx.get(forged, timeout=10)
    assert response.status_code == 401 and "invalid signature" in response.text
    assert (
        httpx.get(sbx.download_url("/home/user/signed.txt", use_signature_expiration=60), timeout=10).text == "secret"
    )
