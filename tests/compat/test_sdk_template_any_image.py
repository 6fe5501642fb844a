"""Templates from images that are not Debian bookworm: envd runs on its own runtime (python3.11 and
glibc under /opt/pmoves/runtime), so a static busybox (no libc, no python, no bash, no /etc) and a
debootstrapped trixie (glibc 2.41, python3.13) become sandboxes the stock SDK drives like any other.
The images are made here and pushed to a loopback registry (Debian's docker-registry)."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from compat.oci_registry import Registry, busybox_rootfs, push, rootfs_layout
from e2b import CommandExitException, FilesystemEventType, Sandbox, Template
from e2b.exceptions import BuildException

from pmoves_e2b.sandbox.templates.hostconfig import read_host_config
from pmoves_e2b.sandbox.templates.rootfs import PRIVATE_NAMESPACES, remove_tree

pytestmark = pytest.mark.stack
# What envd's process has and a user's must not.
RUNTIME_VARIABLES = ("LD_LIBRARY_PATH", "LD_PRELOAD", "PYTHONHOME", "PYTHONPATH", "ENVD_")


def _build(
    registry: Registry, layout: Path, repository: str, template: Template | None = None
) -> tuple[str, list[str]]:
    push(layout, registry, f"{repository}:v1")
    image = f"{registry.address}/{repository}:v1"
    name = f"t-{uuid.uuid4().hex[:8]}"
    source = Template().from_image(image, username=registry.username, password=registry.password)
    logs: list[str] = []
    Template.build(template(source) if template else source, name, on_build_logs=lambda e: logs.append(e.message))
    return name, logs


def _drive(sandbox: Sandbox) -> None:
    """What every sandbox does, whatever its userland: commands, users, env, cwd, files, watch."""
    who = sandbox.commands.run("whoami; id -u; pwd")
    assert who.stdout.split() == ["user", "1000", "/home/user"], who
    assert sandbox.commands.run("id -u", user="root").stdout.strip() == "0"
    assert sandbox.commands.run("pwd", cwd="/tmp").stdout.strip() == "/tmp"
    assert sandbox.commands.run("sudo -n id -u").stdout.strip() == "0"  # E2B's user has passwordless sudo
    with pytest.raises(CommandExitException) as failed:
        sandbox.commands.run("echo out; echo err >&2; exit 3")
    assert (failed.value.exit_code, failed.value.stdout, failed.value.stderr) == (3, "out\n", "err\n")
    env = sandbox.commands.run("env", envs={"GREETING": "hi there"}).stdout.splitlines()
    assert "GREETING=hi there" in env and "HOME=/home/user" in env, env
    assert not [line for line in env if line.startswith(RUNTIME_VARIABLES)], env
    # nothing of envd's runtime in what the user's processes map (their libc is the image's, if any)
    maps = sandbox.commands.run("cat /proc/self/maps").stdout
    assert "/opt/pmoves" not in maps, maps

    handle = sandbox.files.watch_dir("/home/user")
    sandbox.files.write("/home/user/notes.txt", "written through envd\n")
    assert sandbox.files.read("/home/user/notes.txt") == "written through envd\n"
    assert sandbox.commands.run("cat notes.txt; stat -c %u notes.txt").stdout.split() == [
        "written",
        "through",
        "envd",
        "1000",
    ]
    assert "notes.txt" in [entry.name for entry in sandbox.files.list("/home/user")]
    deadline = time.monotonic() + 10
    events: list[Any] = []
    while time.monotonic() < deadline and not any(e.name == "notes.txt" for e in events):
        events += handle.get_new_events()
        time.sleep(0.2)
    handle.stop()
    assert any(
        e.name == "notes.txt" and e.type in (FilesystemEventType.CREATE, FilesystemEventType.WRITE) for e in events
    )


def test_busybox_static_image_without_libc_python_or_bash(
    own_templates: Path, registry: Registry, tmp_path: Path
) -> None:
    rootfs = tmp_path / "busybox"
    if not busybox_rootfs(rootfs):
        pytest.skip("apt-get download busybox-static failed (no apt mirror)")
    rootfs_layout(rootfs, tmp_path / "oci")
    name, logs = _build(
        registry,
        tmp_path / "oci",
        "pmoves/busybox",
        # as root, then as the template's user (no runuser here: envd's runtime's setpriv)
        lambda t: t.run_cmd("echo built > /etc/built", user="root").run_cmd("echo $HOME $(id -u) > built-as.txt"),
    )
    assert any("added user 'user' (uid 1000" in line for line in logs), logs
    assert any("/bin/bash runs /bin/sh" in line for line in logs), logs
    sandbox = Sandbox.create(template=name, timeout=60)
    try:
        _drive(sandbox)
        # the image's own tools, and none of ours on its PATH
        assert sandbox.commands.run("busybox | head -1").stdout.startswith("BusyBox v1.")
        assert sandbox.commands.run("cat /etc/built").stdout == "built\n"
        assert sandbox.files.read("/home/user/built-as.txt") == "/home/user 1000\n"
        missing = sandbox.commands.run("command -v python3 python3.11 || echo none")
        assert missing.stdout.strip() == "none"
    finally:
        sandbox.kill()


def test_image_without_a_shell_is_refused_at_build(own_templates: Path, registry: Registry, tmp_path: Path) -> None:
    rootfs = tmp_path / "noshell"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc/hello").write_text("no shell here\n")
    rootfs_layout(rootfs, tmp_path / "oci")
    with pytest.raises(BuildException, match="the image has no /bin/sh"):
        _build(registry, tmp_path / "oci", "pmoves/noshell")


@pytest.fixture()
def trixie_rootfs(tmp_path: Path) -> Iterator[Path]:
    """Debian trixie (minbase + python3) debootstrapped from the host's mirror: another glibc, python3.13."""
    rootfs = tmp_path / "trixie"
    done = subprocess.run(
        [
            *PRIVATE_NAMESPACES,
            "debootstrap",
            "--variant=minbase",
            "--include=python3",
            "trixie",
            str(rootfs),
            read_host_config().mirror,
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode != 0:
        remove_tree(rootfs)
        pytest.skip(f"debootstrap trixie failed (mirror without trixie?): {done.stdout[-300:]}{done.stderr[-300:]}")
    for cache in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/locale"):
        remove_tree(rootfs / cache)
    try:
        yield rootfs
    finally:
        remove_tree(rootfs)


def test_trixie_image_with_another_glibc_and_python(
    own_templates: Path, registry: Registry, trixie_rootfs: Path, tmp_path: Path
) -> None:
    rootfs_layout(trixie_rootfs, tmp_path / "oci")
    name, logs = _build(
        registry, tmp_path / "oci", "pmoves/trixie", lambda t: t.run_cmd("python3 --version > /home/user/py.txt")
    )
    assert any("added user 'user' (uid 1000" in line for line in logs), logs
    sandbox = Sandbox.create(template=name, timeout=60)
    try:
        _drive(sandbox)
        # the user's python3 is the image's (3.13, its glibc), also in a RUN step of the build
        assert sandbox.files.read("/home/user/py.txt").startswith("Python 3.13")
        assert sandbox.commands.run("python3 --version").stdout.startswith("Python 3.13")
        version = sandbox.commands.run("python3 -c 'import os; print(os.confstr(\"CS_GNU_LIBC_VERSION\"))'")
        assert version.stdout.strip() == "glibc 2.41", version
        assert sandbox.commands.run("cat /etc/debian_version").stdout.startswith("13")
    finally:
        sandbox.kill()


@pytest.mark.slow
def test_busybox_static_image_on_the_microvm_tier(own_templates: Path, registry: Registry, tmp_path: Path) -> None:
    # the guest's pid 1 runs on envd's runtime, as envd does: the image has no python (slow: a TCG boot)
    from pmoves_e2b.sandbox.tiers import METADATA_KEY, TIERS

    unavailable = TIERS["microvm"].probe()
    if unavailable:
        pytest.skip(f"microvm tier unavailable here: {unavailable}")
    rootfs = tmp_path / "busybox"
    if not busybox_rootfs(rootfs):
        pytest.skip("apt-get download busybox-static failed (no apt mirror)")
    rootfs_layout(rootfs, tmp_path / "oci")
    name, _ = _build(registry, tmp_path / "oci", "pmoves/busybox-vm")
    sandbox = Sandbox.create(template=name, metadata={METADATA_KEY: "microvm"}, timeout=600, request_timeout=600)
    try:
        assert sandbox.commands.run("uname -r", request_timeout=600).stdout.strip().endswith("-cloud-amd64")
        who = sandbox.commands.run("whoami; id -u; pwd", request_timeout=600)
        assert who.stdout.split() == ["user", "1000", "/home/user"], who
        assert sandbox.commands.run("busybox | head -1", request_timeout=600).stdout.startswith("BusyBox v1.")
        missing = sandbox.commands.run("command -v python3 python3.11 || echo none", request_timeout=600)
        assert missing.stdout.strip() == "none"
        sandbox.files.write("/home/user/notes.txt", "in a VM\n", request_timeout=600)
        assert sandbox.commands.run("cat notes.txt", request_timeout=600).stdout == "in a VM\n"
    finally:
        sandbox.kill(request_timeout=600)
