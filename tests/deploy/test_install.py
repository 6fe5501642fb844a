"""`pmoves-e2b install` / `uninstall` into a temp root: units systemd accepts, and nothing left after."""

from __future__ import annotations

import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "pmoves_e2b.cli"]
UNIT = Path("etc/systemd/system/pmoves-e2b.service")
ENV = Path("etc/pmoves-e2b/pmoves-e2b.env")

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60)


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    # verify exits 0 on unknown keys and bad values (it only warns): a clean unit has an empty stderr.
    return subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): ("dir" if p.is_dir() else p.read_text()) for p in sorted(root.rglob("*"))}


def unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_install_writes_a_unit_systemd_accepts_and_uninstall_leaves_the_root_as_it_was(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/hostname").write_text("vm\n")  # something install must not touch
    before = tree(root)

    done = run("install", "--root", str(root), "--bind", "0.0.0.0", "--domain", "e2b.example.com")
    assert done.returncode == 0, done.stderr
    unit = root / UNIT
    checked = verify(unit)
    assert checked.returncode == 0 and checked.stderr == "", checked.stderr

    settings = unit_settings(unit.read_text())
    assert settings["EnvironmentFile"] == ["/etc/pmoves-e2b/pmoves-e2b.env"]
    assert settings["Environment"] == ["E2B_DATA_DIR=/var/lib/pmoves-e2b"]
    assert settings["Restart"] == ["on-failure"]
    assert settings["KillMode"] == ["process"]  # a restart must not kill sandboxes
    assert settings["Delegate"] == ["yes"]
    assert settings["NoNewPrivileges"] == ["yes"]
    # The command it starts exists in this installation.
    command = shlex.split(settings["ExecStart"][0])
    assert command[-2:] == ["up", "--foreground"]
    helped = subprocess.run([*command[:-1], "--help"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "--foreground" in helped.stdout

    env = root / ENV
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    assert stat.S_IMODE(env.parent.stat().st_mode) == 0o700
    assert "E2B_BIND=0.0.0.0\n" in env.read_text() and "E2B_DOMAIN=e2b.example.com\n" in env.read_text()

    done = run("uninstall", "--root", str(root))
    assert done.returncode == 0, done.stderr
    assert tree(root) == before


def test_a_broken_unit_is_caught_by_the_same_check(tmp_path: Path) -> None:
    """The check above can fail: systemd-analyze warns about a bad value and an unknown key."""
    assert run("install", "--root", str(tmp_path)).returncode == 0
    unit = tmp_path / UNIT
    unit.write_text(unit.read_text().replace("KillMode=process", "KillMode=procss\nHardenAll=yes"))
    checked = verify(unit)
    assert "procss" in checked.stderr and "HardenAll" in checked.stderr
    assert run("uninstall", "--root", str(tmp_path)).returncode == 0


def test_reinstall_upgrades_the_unit_and_keeps_the_operators_env_file(tmp_path: Path) -> None:
    assert run("install", "--root", str(tmp_path)).returncode == 0
    env = tmp_path / ENV
    env.write_text(env.read_text() + "OPENAI_API_KEY=sk-kept\n")
    (tmp_path / UNIT).write_text("[Service]\nExecStart=/bin/true\n")  # an older unit

    assert run("install", "--root", str(tmp_path)).returncode == 0
    assert "OPENAI_API_KEY=sk-kept" in env.read_text()
    assert "KillMode=process" in (tmp_path / UNIT).read_text()
    assert run("uninstall", "--root", str(tmp_path)).returncode == 0
    assert list(tmp_path.iterdir()) == []


def test_install_never_overwrites_a_unit_it_did_not_write(tmp_path: Path) -> None:
    foreign = tmp_path / UNIT
    foreign.parent.mkdir(parents=True)
    foreign.write_text("[Service]\nExecStart=/usr/bin/mine\n")
    done = run("install", "--root", str(tmp_path))
    assert done.returncode == 1 and "was not written by pmoves-e2b install" in done.stderr
    assert foreign.read_text() == "[Service]\nExecStart=/usr/bin/mine\n"
    assert not (tmp_path / ENV).exists()


def test_uninstall_without_install_and_bad_values_are_one_line_errors(tmp_path: Path) -> None:
    done = run("uninstall", "--root", str(tmp_path))
    assert done.returncode == 1 and "nothing to uninstall" in done.stderr and "Traceback" not in done.stderr
    done = run("install", "--root", str(tmp_path), "--bind", "0.0.0.0 evil")
    assert done.returncode == 1 and "--bind must be one word" in done.stderr
    done = run("install", "--root", str(tmp_path), "--data-dir", "relative/dir")
    assert done.returncode == 1 and "absolute path" in done.stderr
    assert list(tmp_path.iterdir()) == []
