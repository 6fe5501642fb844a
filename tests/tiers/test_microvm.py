"""The microvm tier (sandbox/backends/microvm/) through the stock `e2b` SDK against a real stack:
a representative subset (create, commands, files, kill, limits) and creates from a saved VM. Slow:
under TCG (no usable KVM on the dev/CI machines) the first create boots and saves a VM (30-60 s),
later creates restore it (about a second).

One stack for the module; its guest images and snapshots live in one cache dir per test run.
After each test nothing of a killed sandbox may be left: QEMU, netns (with the tap), cgroups, files.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2b import CommandExitException, Sandbox
from stack.harness import RunningStack, make_stack, stop_and_clean

from pmoves_e2b.sandbox.backends.microvm import guest
from pmoves_e2b.sandbox.backends.ns import network
from pmoves_e2b.sandbox.tiers import METADATA_KEY, TIERS

pytestmark = [pytest.mark.slow, pytest.mark.stack]

MEMORY_MB = 512
CPUS = 1
TIMEOUT = 600  # seconds an SDK request may take: a cold TCG boot on a loaded 2-core machine


def _unavailable() -> str | None:
    return TIERS["microvm"].probe()


@pytest.fixture(scope="module")
def microvm_stack() -> Iterator[RunningStack]:
    reason = _unavailable()
    if reason:
        pytest.skip(f"microvm tier unavailable here: {reason}")
    cache = Path(tempfile.gettempdir()) / f"pmoves-e2b-microvm-cache-{os.getpid()}"
    stack = make_stack(
        {
            "E2B_MICROVM_CACHE_DIR": str(cache),
            "E2B_SANDBOX_MEMORY_MB": str(MEMORY_MB),
            "E2B_SANDBOX_CPU_LIMIT": str(CPUS),
            "E2B_SANDBOX_DISK_MB": "1024",
            "E2B_POOL_SIZE": "0",
        }
    )
    try:
        stack.up()
        yield stack
    finally:
        try:
            stop_and_clean(stack)
        finally:
            shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture()
def sdk(microvm_stack: RunningStack, monkeypatch: pytest.MonkeyPatch) -> RunningStack:
    for name in list(os.environ):
        if name.startswith("E2B_"):
            monkeypatch.delenv(name)
    for name, value in microvm_stack.sdk_env.items():
        monkeypatch.setenv(name, value)
    return microvm_stack


def _create() -> Sandbox:
    return Sandbox.create(metadata={METADATA_KEY: "microvm"}, timeout=600, request_timeout=TIMEOUT)


def _left_of(stack: RunningStack, sandbox_id: str) -> list[str]:
    left = []
    if f"{network.NETNS_PREFIX}{sandbox_id}" in network.list_netns():
        left.append("netns")
    if (stack.data_dir / "microvm-sandboxes" / sandbox_id).exists():
        left.append("sandbox dir")
    for pid in stack.processes():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if sandbox_id.encode() in cmdline:
            left.append(f"process {pid}: {cmdline[:80]!r}")
    return left


def test_commands_and_files_run_in_a_guest_kernel_and_kill_leaves_nothing(sdk: RunningStack) -> None:
    sandbox = _create()
    try:
        kernel = sandbox.commands.run("uname -r", request_timeout=TIMEOUT).stdout.strip()
        assert kernel.endswith("-cloud-amd64"), kernel  # Debian's cloud kernel, not the host's
        assert kernel != platform.release()
        who = sandbox.commands.run("id -un && pwd", request_timeout=TIMEOUT).stdout.split()
        assert who == ["user", "/home/user"]
        sandbox.files.write("/home/user/hello.txt", "from the host\n", request_timeout=TIMEOUT)
        assert sandbox.files.read("/home/user/hello.txt", request_timeout=TIMEOUT) == "from the host\n"
        result = sandbox.commands.run("cat /home/user/hello.txt | tr a-z A-Z", request_timeout=TIMEOUT)
        assert result.stdout == "FROM THE HOST\n"
        with pytest.raises(CommandExitException) as failed:
            sandbox.commands.run("echo out; exit 3", request_timeout=TIMEOUT)
        assert failed.value.exit_code == 3 and failed.value.stdout == "out\n"
    finally:
        sandbox_id = sandbox.sandbox_id
        sandbox.kill(request_timeout=TIMEOUT)
    deadline = time.monotonic() + 30  # kills answer at once; the teardown runs in the background
    while _left_of(sdk, sandbox_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _left_of(sdk, sandbox_id)


def test_memory_cpus_disk_and_pids_are_the_sandbox_limits(sdk: RunningStack) -> None:
    sandbox = _create()
    try:
        assert sandbox.commands.run("nproc", request_timeout=TIMEOUT).stdout.strip() == str(CPUS)
        total_kb = int(sandbox.commands.run("awk '/MemTotal/{print $2}' /proc/meminfo").stdout)
        assert 0.8 * MEMORY_MB * 1024 < total_kb <= MEMORY_MB * 1024
        # allocating more than the guest has ends in the guest's OOM killer, and the sandbox lives on
        with pytest.raises(CommandExitException) as hog:
            sandbox.commands.run(
                f"python3 -c 'b = bytearray({2 * MEMORY_MB} * 1024 * 1024); print(len(b))'", request_timeout=TIMEOUT
            )
        assert hog.value.exit_code != 0 and str(2 * MEMORY_MB * 1024 * 1024) not in hog.value.stdout
        assert sandbox.commands.run("echo alive", request_timeout=TIMEOUT).stdout == "alive\n"
        # the disk is the sandbox's own: beyond it is ENOSPC
        with pytest.raises(CommandExitException) as full:
            sandbox.commands.run("fallocate -l 2G /home/user/big", request_timeout=TIMEOUT)
        assert "No space left on device" in full.value.stderr
        # pids: a fork loop stops at the sandbox's pids.max (its children sleep with no stdout)
        forks = sandbox.commands.run(f"python3 -c {shlex.quote(FORK_LOOP)}", request_timeout=TIMEOUT)
        assert 0 < int(forks.stdout) < PIDS_MAX
        assert sandbox.commands.run("echo alive", request_timeout=TIMEOUT).stdout == "alive\n"
    finally:
        sandbox.kill(request_timeout=TIMEOUT)


PIDS_MAX = 1024  # the backend's default pids_max
FORK_LOOP = """
import os, time
n = 0
while n < 4000:
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        os.close(1); os.close(2); time.sleep(15); os._exit(0)
    n += 1
print(n)
"""


def test_sandboxes_restored_from_one_saved_vm_are_independent_with_the_hosts_time_and_own_randomness(
    sdk: RunningStack,
) -> None:
    first, second = _create(), _create()
    try:
        sandboxes = (first, second)
        for sandbox in sandboxes:
            # restored, not booted: envd did not start in this sandbox's VM
            assert "restore_s" in _details(sdk, sandbox.sandbox_id)
            console = sdk.data_dir / "microvm-sandboxes" / sandbox.sandbox_id / "console.log"
            assert guest.RESTORED_MARKER in console.read_text()
        first.files.write("/home/user/mine.txt", "first", request_timeout=TIMEOUT)
        missing = second.commands.run("test -e /home/user/mine.txt || echo absent", request_timeout=TIMEOUT)
        assert missing.stdout == "absent\n"
        uuids = {s.commands.run("cat /proc/sys/kernel/random/uuid").stdout for s in sandboxes}
        assert len(uuids) == 2  # same saved random pool, reseeded with the host's entropy on restore
        for sandbox in sandboxes:
            guest_time = float(sandbox.commands.run("date +%s.%N", request_timeout=TIMEOUT).stdout)
            assert abs(guest_time - time.time()) < 5
    finally:
        first.kill(request_timeout=TIMEOUT)
        second.kill(request_timeout=TIMEOUT)


def test_code_interpreter_sandboxes_restore_a_warm_server_each_with_its_own_randomness_keys_and_token(
    sdk: RunningStack,
) -> None:
    from e2b_code_interpreter import Sandbox as CodeSandbox

    def create() -> tuple[CodeSandbox, float]:
        started = time.monotonic()
        sandbox = CodeSandbox.create(metadata={METADATA_KEY: "microvm"}, timeout=600, request_timeout=TIMEOUT)
        return sandbox, time.monotonic() - started

    # the template's first create boots a VM, starts the interpreter in it and saves it running
    saving, _ = create()
    saving.kill(request_timeout=TIMEOUT)
    (first, first_s), (second, second_s) = create(), create()
    try:
        sandboxes = ((first, first_s), (second, second_s))
        for sandbox, create_s in sandboxes:
            details = _details(sdk, sandbox.sandbox_id)
            assert details["template_started"] is True
            assert "server_reseeded" in details["restore_s"]  # type: ignore[operator]
            # the interpreter was not started again: it has run since before this create began
            servers = sandbox.commands.run(
                "ps -eo etimes=,args= | grep -- '-m pmoves_e2b.interpreter --host' | grep -v grep",
                request_timeout=TIMEOUT,
            ).stdout.splitlines()
            assert len(servers) == 1, servers
            assert int(servers[0].split()[0]) > create_s, (servers, create_s)
            guest_time = sandbox.run_code("import time; time.time()", timeout=TIMEOUT).text
            assert guest_time is not None and abs(float(guest_time) - time.time()) < 5
        # separate state
        first.run_code("mine = 'first'", timeout=TIMEOUT)
        assert second.run_code("'mine' in globals()", timeout=TIMEOUT).text == "False"
        assert first.run_code("mine == 'first'", timeout=TIMEOUT).text == "True"
        # what the saved memory held the same in both is different now
        draws = "import os, random, uuid; (random.random(), str(uuid.uuid4()), os.urandom(16).hex())"
        first_draw = first.run_code(draws, timeout=TIMEOUT).text
        second_draw = second.run_code(draws, timeout=TIMEOUT).text
        assert first_draw and second_draw
        for a, b in zip(first_draw.split(","), second_draw.split(","), strict=True):
            assert a != b, (first_draw, second_draw)
        key = "get_ipython().kernel.session.key"
        assert first.run_code(key, timeout=TIMEOUT).text != second.run_code(key, timeout=TIMEOUT).text
        # per-sandbox access tokens: one sandbox's token runs no code in the other's interpreter
        assert first._envd_access_token and first._envd_access_token != second._envd_access_token
        refused = first._client.post(
            f"{first._jupyter_url}/execute",
            json={"code": "1"},
            headers={
                "E2b-Sandbox-Id": first.sandbox_id,
                "E2b-Sandbox-Port": "49999",
                "X-Access-Token": str(second._envd_access_token),
            },
            timeout=TIMEOUT,
        )
        assert refused.status_code == 401
    finally:
        first.kill(request_timeout=TIMEOUT)
        second.kill(request_timeout=TIMEOUT)


def _details(stack: RunningStack, sandbox_id: str) -> dict[str, object]:
    state = stack.data_dir / "microvm-sandboxes" / sandbox_id / "state.json"
    details: dict[str, object] = json.loads(state.read_text())
    return details


def test_pause_saves_the_vm_to_disk_and_it_resumes_after_a_service_restart(sdk: RunningStack) -> None:
    sandbox = _create()
    try:
        sandbox.files.write("/home/user/state.txt", "kept", request_timeout=TIMEOUT)
        sleeper = sandbox.commands.run("sleep 10000", background=True, request_timeout=TIMEOUT)
        sandbox.commands.run("echo 42 > /dev/shm/in-memory", request_timeout=TIMEOUT)
        assert sandbox.pause() is True
        details = _details(sdk, sandbox.sandbox_id)
        assert Path(str(details["paused_state"])).stat().st_size > 0
        assert not [pid for pid in sdk.processes() if _is_qemu_of(pid, sandbox.sandbox_id)]  # no VM in memory

        old_pid = sdk.service_pid("sandbox")
        assert old_pid is not None
        os.kill(old_pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while sdk.service_pid("sandbox") in (None, old_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        sdk.wait_healthy("sandbox", timeout=60)

        resumed = Sandbox.connect(sandbox.sandbox_id, request_timeout=TIMEOUT)
        assert resumed.files.read("/home/user/state.txt", request_timeout=TIMEOUT) == "kept"
        assert resumed.commands.run("cat /dev/shm/in-memory", request_timeout=TIMEOUT).stdout == "42\n"
        alive = resumed.commands.run(f"kill -0 {sleeper.pid} && echo running", request_timeout=TIMEOUT)
        assert alive.stdout == "running\n"
        assert "paused_state" not in _details(sdk, sandbox.sandbox_id)
    finally:
        sandbox.kill(request_timeout=TIMEOUT)


def _is_qemu_of(pid: int, sandbox_id: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False
    return b"qemu-system" in cmdline and sandbox_id.encode() in cmdline


def test_the_guest_sees_no_host_process_and_cannot_reach_the_host(sdk: RunningStack) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("0.0.0.0", 0))  # every host address, the sandbox's gateway too
    listener.listen(8)
    port = listener.getsockname()[1]
    sandbox = _create()
    try:
        host_address = str(_details(sdk, sandbox.sandbox_id)["host_address"])
        # every process but the guest kernel's threads (kthreadd, pid 2, and its children)
        processes = sandbox.commands.run("ps -N -p 2 --ppid 2 -o comm=", request_timeout=TIMEOUT).stdout.split()
        assert "pmoves-e2b" not in processes and "qemu-system-x86" not in processes
        assert len(processes) < 20, processes  # the guest's own few, not the host's
        probe = f"import socket; socket.create_connection(('{host_address}', {port}), timeout=3)"
        with pytest.raises(CommandExitException) as refused:
            sandbox.commands.run(f"python3 -c {shlex.quote(probe)}", request_timeout=TIMEOUT)
        assert "timed out" in refused.value.stderr or "refused" in refused.value.stderr
        socket.create_connection((host_address, port), timeout=3).close()  # the port is open to the host
    finally:
        sandbox.kill(request_timeout=TIMEOUT)
        listener.close()
