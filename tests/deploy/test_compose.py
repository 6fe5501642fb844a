"""deploy/compose.yaml with podman: the images built here from the registries, `--profile e2b up`, all
healthy, the stock SDK through the containerised e2b-sandbox, hardened containers, and a `down` that
leaves no container, netns, mount, cgroup or nft rule behind."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.compose_harness import COMPOSE_FILE, SERVICES, ComposeStack, built_images, podman

pytestmark = pytest.mark.slow

CAP_NAMES = (
    "CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP LINUX_IMMUTABLE NET_BIND_SERVICE "
    "NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER SYS_MODULE SYS_RAWIO SYS_CHROOT SYS_PTRACE SYS_PACCT "
    "SYS_ADMIN SYS_BOOT SYS_NICE SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP "
    "MAC_OVERRIDE MAC_ADMIN SYSLOG WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF CHECKPOINT_RESTORE"
).split()
SANDBOX_UID_BASE = 200000  # sandbox processes run as host uids from here (sandbox/backends/ns/slots.py)


def host_state() -> dict[str, set[str]]:
    """podman's netns (`netns-*`) and the nft tables on the host. Stacks on the host (other tests on this
    machine) add `e2b-*` netns and `pmoves_e2b*` tables of their own at any time: not ours to judge."""
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    return {
        "netns": {line.split()[0] for line in netns.splitlines() if line.startswith("netns-")},
        "nft": {line for line in tables.splitlines() if " pmoves_e2b" not in line},
    }


@pytest.fixture(scope="module")
def stack() -> Iterator[ComposeStack]:
    built_images()
    before = host_state()
    compose = ComposeStack(("e2b",))
    compose.before = before  # type: ignore[attr-defined]
    try:
        compose.up()
        compose.healthy_after = compose.wait_healthy(SERVICES)  # type: ignore[attr-defined]
        yield compose
    finally:
        compose.cleanup()


def status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def caps(mask: str) -> set[str]:
    bits = int(mask, 16)
    return {name for number, name in enumerate(CAP_NAMES) if bits >> number & 1}


def container_pids(cid: str) -> dict[int, bool]:
    """Host pid -> whether it is the container's own process (False: a sandbox in a nested cgroup)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            lines = (proc / "cgroup").read_text().splitlines()
        except OSError:
            continue
        memory = next((line.split(":", 2)[2] for line in lines if line.split(":")[1] == "memory"), "")
        if f"/libpod-{cid}" in memory:
            found[int(proc.name)] = memory.endswith(f"/libpod-{cid}")
    return found


def test_all_four_services_and_nats_are_healthy(stack: ComposeStack) -> None:
    print(f"compose up -> all healthy: {stack.healthy_after:.1f} s")  # type: ignore[attr-defined]
    assert set(stack.containers()) == set(SERVICES)


def test_the_stock_sdk_runs_a_command_through_the_containerised_e2b_sandbox(
    stack: ComposeStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    from e2b import Sandbox

    for key, value in stack.sdk_env.items():
        monkeypatch.setenv(key, value)
    sandbox = Sandbox.create(timeout=120)
    try:
        result = sandbox.commands.run("id -un && echo from-the-container > /tmp/f && cat /tmp/f")
        assert result.stdout.split() == ["user", "from-the-container"]
        assert sandbox.files.read("/tmp/f") == "from-the-container\n"
    finally:
        sandbox.kill()


def test_concurrent_creates_and_kills_all_succeed_on_reused_network_namespaces(
    stack: ComposeStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CI run found a create on a kept netns failing in the container (`nsenter: reassociate to
    namespace 'ns/net' failed: Invalid argument`): the launcher entered the netns while it was still
    being renamed to the sandbox's name. Rounds of concurrent creates and kills reuse the netns of
    the previous round's sandboxes."""
    from e2b import Sandbox

    for key, value in stack.sdk_env.items():
        monkeypatch.setenv(key, value)

    def create_run_kill(_: int) -> str:
        sandbox = Sandbox.create(timeout=120)
        try:
            return sandbox.commands.run("echo ok").stdout.strip()
        finally:
            sandbox.kill()

    with ThreadPoolExecutor(4) as pool:
        for _ in range(6):
            assert list(pool.map(create_run_kill, range(4))) == ["ok"] * 4


def test_containers_run_as_65532_read_only_with_only_the_documented_capabilities(stack: ComposeStack) -> None:
    spec: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    for name, info in stack.containers().items():
        documented = set(spec[name].get("cap_add", []))
        assert info["HostConfig"]["ReadonlyRootfs"] is True, name
        pids = [pid for pid, own in container_pids(info["Id"]).items() if own]
        assert pids, name
        for pid in pids:
            proc = status(pid)
            uid = {int(u) for u in proc["Uid"].split()}
            # e2b-sandbox is root in its container (documented in compose.yaml); everything else 65532.
            assert uid == ({0} if name == "e2b-sandbox" else {65532}), (name, proc["Name"], uid)
            assert caps(proc["CapBnd"]) == documented, (name, proc["Name"])
            assert proc["NoNewPrivs"] == "1", name
        write = podman("exec", info["Id"], "/usr/bin/python3", "-c", "open('/probe', 'w')", check=False)
        assert "Read-only file system" in write.stderr, (name, write.stderr)
        data = podman("exec", info["Id"], "/usr/bin/python3", "-c", "open('/data/probe', 'w')", check=False)
        assert data.returncode == 0, (name, data.stderr)
        shell = podman("exec", info["Id"], "/bin/bash", "-c", "true", check=False)
        assert shell.returncode != 0, name


def test_down_leaves_no_container_netns_mount_cgroup_or_nft_rule(
    stack: ComposeStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    from e2b import Sandbox

    for key, value in stack.sdk_env.items():
        monkeypatch.setenv(key, value)
    # A sandbox still running when the stack goes down.
    sandbox = Sandbox.create(timeout=300)
    assert sandbox.commands.run("true").exit_code == 0
    containers = stack.containers()
    ids = [info["Id"] for info in containers.values()]
    sandbox_pids = [pid for pid, own in container_pids(containers["e2b-sandbox"]["Id"]).items() if not own]
    assert sandbox_pids and all(int(status(pid)["Uid"].split()[0]) >= SANDBOX_UID_BASE for pid in sandbox_pids)

    stack.down()

    assert stack.containers() == {}
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in sandbox_pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in sandbox_pids if Path(f"/proc/{pid}").exists()]
    after = host_state()
    assert after["netns"] - stack.before["netns"] == set()  # type: ignore[attr-defined]
    assert after["nft"] - stack.before["nft"] == set()  # type: ignore[attr-defined]
    ruleset = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout
    mountinfo = Path("/proc/self/mountinfo").read_text()
    for cid in ids:
        assert cid not in ruleset and cid[:12] not in ruleset
        assert cid not in mountinfo
        assert not list(Path("/sys/fs/cgroup").glob(f"*/libpod_parent/libpod-{cid}*"))
    assert stack.project not in ruleset and stack.project not in mountinfo
    networks = podman("network", "ls", "--format", "{{.Name}}").stdout.split()
    assert not [n for n in networks if n.startswith(stack.project)]
    volumes = podman("volume", "ls", "--format", "{{.Name}}").stdout.split()
    assert not [v for v in volumes if v.startswith(stack.project)]
    assert not re.search(r"pmoves-e2b-test", subprocess.run(["ip", "link"], capture_output=True, text=True).stdout)
