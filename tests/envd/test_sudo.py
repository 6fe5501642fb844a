"""sudo through envd: a real envd (root) on the host serves its sudo socket; the shim runs as a
throwaway user who is a member of a throwaway sudo-like group, and as ``nobody``, who is not."""

from __future__ import annotations

import os
import pwd
import secrets
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from envd.conftest import REPO_SRC, RunningEnvd, start_envd, stop_envd
from pmoves_e2b.envd.sudo import SECURE_PATH, sudoers_grants

SHIM_SOURCE = REPO_SRC / "pmoves_e2b/envd/sudo_shim.py"
TIMEOUT = 20.0

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("groupadd") or not Path("/usr/bin/python3").exists(),
    reason="needs root (users, groups, an envd as root) and /usr/bin/python3 for the shim",
)


@dataclass
class SudoSetup:
    envd: RunningEnvd
    user: pwd.struct_passwd
    shim: str
    socket: str
    scratch: Path

    def run(
        self, *args: str, as_user: str | None = None, env: dict[str, str] | None = None, **kwargs: object
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args, as_user=as_user), check=False, env=self.env(env), text=True,
            capture_output="stdout" not in kwargs,
            timeout=TIMEOUT, **kwargs,  # type: ignore[arg-type]
        )  # fmt: skip

    def argv(self, *args: str, as_user: str | None = None) -> list[str]:
        entry = pwd.getpwnam(as_user) if as_user else self.user
        return [
            "setpriv",
            f"--reuid={entry.pw_uid}",
            f"--regid={entry.pw_gid}",
            "--init-groups",
            "--",
            self.shim,
            *args,
        ]

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {
            "PATH": "/usr/bin:/bin",
            "HOME": self.user.pw_dir,
            "USER": self.user.pw_name,
            "LANG": "C.UTF-8",
            "PMOVES_SUDO_SOCKET": self.socket,
            **(extra or {}),
        }


@pytest.fixture(scope="module")
def sudo(envd_user: str) -> Iterator[SudoSetup]:
    group = f"e2bsudo{secrets.token_hex(3)}"
    subprocess.run(["groupadd", group], check=True)
    scratch = Path(tempfile.mkdtemp(prefix="envd-sudo-"))
    try:
        subprocess.run(["usermod", "-aG", group, envd_user], check=True)
        scratch.chmod(0o755)  # the shim and the socket must be reachable for every test user
        shim = scratch / "sudo"
        shutil.copyfile(SHIM_SOURCE, shim)
        shim.chmod(0o755)
        socket_path = scratch / "run/sudo.sock"
        envd = start_envd(envd_user, extra_env={"ENVD_SUDO_SOCKET": str(socket_path), "ENVD_SUDO_GROUP": group})
        try:
            _wait_for(socket_path.exists, "envd's sudo socket")
            yield SudoSetup(envd, pwd.getpwnam(envd_user), str(shim), str(socket_path), scratch)
        finally:
            stderr = stop_envd(envd)
            assert "Traceback" not in stderr, stderr
        assert not socket_path.exists(), "envd leaves its sudo socket behind"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        subprocess.run(["gpasswd", "-d", envd_user, group], check=False, capture_output=True)
        subprocess.run(["groupdel", group], check=False, capture_output=True)


def _wait_for(condition: object, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _read_line(proc: subprocess.Popen[str], timeout: float = TIMEOUT) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise TimeoutError("no output from the command")
    return proc.stdout.readline().strip()


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone: ENOENT once reaped, ESRCH if it dies mid-read
        return False
    return stat.split(") ")[-1][0] != "Z"


def test_runs_as_root_and_passes_exit_codes(sudo: SudoSetup) -> None:
    assert sudo.run("id", "-u").stdout == "0\n"
    assert sudo.run("-n", "true").returncode == 0
    assert sudo.run("sh", "-c", "exit 3").returncode == 3
    assert sudo.run("false").returncode == 1
    missing = sudo.run("no-such-command-here")
    assert (missing.returncode, missing.stderr) == (1, "sudo: no-such-command-here: command not found\n")
    assert sudo.run("--", "sh", "-c", "echo $0 $1", "a", "b").stdout == "a b\n"
    assert sudo.run("/no/such/program").stderr == "sudo: /no/such/program: command not found\n"
    tool = sudo.scratch / "bin/only-in-callers-path"
    tool.parent.mkdir(exist_ok=True)
    tool.write_text("#!/bin/sh\nid -u\n")
    tool.chmod(0o755)
    found = sudo.run("only-in-callers-path", env={"PATH": f"relative:{tool.parent}:/usr/bin:/bin"})
    assert found.stdout == "0\n"  # e.g. a venv's pip: found like sudo would not, run with secure_path
    assert sudo.run("./bin/only-in-callers-path", cwd=sudo.scratch).stdout == "0\n"


def test_flags_agents_use(sudo: SudoSetup) -> None:
    assert sudo.run("-v").returncode == 0
    assert sudo.run("-k").returncode == 0
    assert sudo.run("-K").returncode == 0
    assert sudo.run("-k", "id", "-u").stdout == "0\n"
    listing = sudo.run("-l")
    assert listing.returncode == 0 and "(ALL : ALL) NOPASSWD: ALL" in listing.stdout
    assert sudo.run("-V").stdout.startswith("Sudo version")
    bare = sudo.run()
    assert bare.returncode == 1 and "usage: sudo" in bare.stderr
    bad = sudo.run("-Z", "true")
    assert bad.returncode == 1 and "invalid option" in bad.stderr
    assert sudo.run("-nEH", "-u", "root", "id", "-u").stdout == "0\n"
    marker = sudo.scratch / "from-background"
    assert sudo.run("-b", "sh", "-c", f"sleep 0.2; id -u > {marker}", stdout=subprocess.DEVNULL).returncode == 0
    _wait_for(lambda: marker.exists() and marker.read_text() == "0\n", "the background command")


def test_stdin_stdout_stderr_are_the_callers_fds(sudo: SudoSetup) -> None:
    target = sudo.scratch / "written-by-root"
    teed = sudo.run("tee", str(target), input="piped line\n")
    assert teed.stdout == "piped line\n"
    assert target.read_text() == "piped line\n" and target.stat().st_uid == 0
    both = sudo.run("sh", "-c", "echo out; echo err >&2")
    assert (both.stdout, both.stderr) == ("out\n", "err\n")
    big = "x" * (1 << 20)
    assert sudo.run("cat", input=big).stdout == big  # more than a pipe buffer, no deadlock
    with open(sudo.scratch / "stdout-file", "w+") as out:
        assert sudo.run("echo", "to a file", stdout=out, stderr=subprocess.PIPE).returncode == 0
        out.seek(0)
        assert out.read() == "to a file\n"
    assert sudo.run("cat", stdin=subprocess.DEVNULL).stdout == ""


def test_other_target_users(sudo: SudoSetup) -> None:
    assert sudo.run("-u", sudo.user.pw_name, "id", "-un").stdout == f"{sudo.user.pw_name}\n"
    assert sudo.run(f"--user={sudo.user.pw_name}", "sh", "-c", "echo $HOME").stdout == f"{sudo.user.pw_dir}\n"
    assert sudo.run("-u", f"#{sudo.user.pw_uid}", "id", "-u").stdout == f"{sudo.user.pw_uid}\n"
    assert sudo.run("-u", "nobody", "id", "-un", as_user="root").stdout == "nobody\n"
    unknown = sudo.run("-u", "no-such-user-here", "true")
    assert (unknown.returncode, unknown.stderr) == (1, "sudo: unknown user no-such-user-here\n")


def _env_of(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    assert result.returncode == 0, result.stderr
    return dict(line.split("=", 1) for line in result.stdout.splitlines())


def test_environment_reset_and_preserved(sudo: SudoSetup) -> None:
    caller = {"FOO": "bar", "TERM": "xterm", "LC_ALL": "C.UTF-8", "PATH": f"{sudo.scratch}:/usr/bin:/bin"}
    reset = _env_of(sudo.run("env", env=caller))
    assert "FOO" not in reset and "PMOVES_SUDO_SOCKET" not in reset
    assert {k: reset[k] for k in ("HOME", "USER", "LOGNAME", "PATH", "TERM", "LANG", "LC_ALL")} == {
        "HOME": "/root", "USER": "root", "LOGNAME": "root", "PATH": SECURE_PATH, "TERM": "xterm",
        "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
    }  # fmt: skip
    assert (reset["SUDO_USER"], reset["SUDO_UID"]) == (sudo.user.pw_name, str(sudo.user.pw_uid))
    assert reset["SUDO_COMMAND"] == shutil.which("env", path=SECURE_PATH)
    kept = _env_of(sudo.run("-E", "env", env=caller))
    assert (kept["FOO"], kept["HOME"], kept["USER"], kept["PATH"]) == ("bar", sudo.user.pw_dir, "root", SECURE_PATH)
    assert _env_of(sudo.run("-E", "-H", "env", env=caller))["HOME"] == "/root"
    some = _env_of(sudo.run("--preserve-env=FOO", "env", "BAZ=1", env={**caller, "QUX": "2"}))
    assert some["FOO"] == "bar" and "QUX" not in some
    assigned = _env_of(sudo.run("BAR=one two", "env", env=caller))
    assert assigned["BAR"] == "one two"


def test_login_and_interactive_shells(sudo: SudoSetup) -> None:
    root_home = pwd.getpwuid(0).pw_dir
    assert sudo.run("-i", "pwd", cwd=sudo.scratch).stdout == f"{root_home}\n"
    assert sudo.run("-s", "pwd", cwd=sudo.scratch).stdout == f"{sudo.scratch}\n"
    assert sudo.run("-D", "/", "pwd").stdout == "/\n"
    assert sudo.run("-s", input="id -u; echo $SUDO_USER\n").stdout == f"0\n{sudo.user.pw_name}\n"
    assert sudo.run("-i", input="id -un; pwd\n").stdout == f"root\n{root_home}\n"
    assert sudo.run("-u", sudo.user.pw_name, "-i", "pwd").stdout == f"{sudo.user.pw_dir}\n"


def test_users_outside_the_sudo_group_are_refused(sudo: SudoSetup) -> None:
    target = sudo.scratch / "must-not-exist"
    for args in (("touch", str(target)), ("-v",), ("-l",), ("-u", "root", "-E", "id")):
        refused = sudo.run(*args, as_user="nobody")
        assert (refused.returncode, refused.stderr) == (1, "sudo: nobody is not in the sudoers file\n")
    assert not target.exists()


def test_signals_reach_the_command(sudo: SudoSetup) -> None:
    script = 'trap "echo interrupted; exit 7" INT; echo ready; while :; do sleep 0.05; done'
    proc = subprocess.Popen(sudo.argv("sh", "-c", script), env=sudo.env(), stdout=subprocess.PIPE, text=True)
    try:
        assert _read_line(proc) == "ready"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(TIMEOUT) == 7
        assert proc.stdout is not None and proc.stdout.read() == "interrupted\n"
    finally:
        proc.kill()
        proc.wait(TIMEOUT)
        proc.stdout.close()  # type: ignore[union-attr]


def test_sigterm_kills_the_command_and_the_shim_dies_of_it(sudo: SudoSetup) -> None:
    proc = subprocess.Popen(
        sudo.argv("sh", "-c", "echo $$; exec sleep 60"), env=sudo.env(), stdout=subprocess.PIPE, text=True
    )
    try:
        child = int(_read_line(proc))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == -signal.SIGTERM
        _wait_for(lambda: not _pid_alive(child), "the command to die")
    finally:
        proc.kill()
        proc.wait(TIMEOUT)
        proc.stdout.close()  # type: ignore[union-attr]


def test_a_killed_shim_takes_its_command_along(sudo: SudoSetup) -> None:
    proc = subprocess.Popen(
        sudo.argv("sh", "-c", "echo $$; exec sleep 60"), env=sudo.env(), stdout=subprocess.PIPE, text=True
    )
    try:
        child = int(_read_line(proc))
        proc.kill()
        proc.wait(TIMEOUT)
        _wait_for(lambda: not _pid_alive(child), "the orphaned command to be killed")
    finally:
        proc.kill()
        proc.wait(TIMEOUT)
        proc.stdout.close()  # type: ignore[union-attr]


def test_sudoers_nopasswd_all_rules_are_grants(tmp_path: Path) -> None:
    (tmp_path / "sudoers").write_text(
        "Defaults env_reset\nalice ALL=(ALL:ALL) NOPASSWD: ALL\n%ops ALL=(ALL) NOPASSWD:ALL\n"
        "bob ALL=(ALL:ALL) ALL\ncarol ALL=(root) NOPASSWD: /usr/bin/apt-get\n"
    )
    (tmp_path / "d").mkdir()
    (tmp_path / "d/dave").write_text("dave ALL=(ALL:ALL) NOPASSWD: ALL\n")
    (tmp_path / "d/eve.disabled").write_text("eve ALL=(ALL:ALL) NOPASSWD: ALL\n")
    assert sudoers_grants((str(tmp_path / "sudoers"), str(tmp_path / "d/*"))) == {"alice", "%ops", "dave"}
