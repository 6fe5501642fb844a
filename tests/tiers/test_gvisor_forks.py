"""A fork's hidden snapshot is collected, through the stock SDK on a gvisor-default stack.

``Sandbox.fork`` takes a memory snapshot that no list shows (its record, its layer and its memory
image in the templates dir) and restores the forks from it. What a user would notice if it were
never collected: the templates dir (disk) grows with every fork and the hidden template is listed
by ``GET /templates`` long after every fork is gone. It must stay while any fork lives (running or
paused: a paused fork's files sit on that layer) and go with the last one, with forks that failed
to start, and after a restart of the stack that ended the forks (or crashed mid-fork)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2b import Sandbox
from e2b.exceptions import SandboxException

from pmoves_e2b.sandbox.backends.gvisor import runsc

pytestmark = [
    pytest.mark.stack,
    pytest.mark.skipif(runsc.probe() is not None, reason=f"gVisor unavailable: {runsc.probe()}"),
]


def _fork_files(templates: Path) -> list[str]:
    """Everything a fork's hidden snapshot writes: record, layer (and its staging), memory image."""
    found = [*templates.glob("fork-*.json"), *(templates / "layers").glob("*snapshot-fork-*")]
    found += (templates / "snapshots").glob("fork-*") if (templates / "snapshots").is_dir() else []
    return sorted(str(path.relative_to(templates)) for path in found)


def _bytes(templates: Path) -> int:
    """Disk the templates dir holds (the shared layers are symlinks: counted as links), but for its
    top-level dirs themselves (``snapshots/`` is made by the first snapshot and stays)."""
    total = 0
    for root, dirs, files in os.walk(templates):
        for name in dirs if root != str(templates) else []:
            total += os.lstat(os.path.join(root, name)).st_blocks * 512
        for name in files:
            total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def _listed_templates(stack: Any) -> list[str]:
    answer = httpx.get(
        f"{stack.sdk_env['E2B_API_URL']}/templates", headers={"X-API-Key": stack.sdk_env["E2B_API_KEY"]}, timeout=30
    )
    answer.raise_for_status()
    return [entry["templateID"] for entry in answer.json()]


def _wait_collected(templates: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while _fork_files(templates):
        assert time.monotonic() < deadline, f"the fork's hidden snapshot was not collected: {_fork_files(templates)}"
        time.sleep(0.2)


def _forks(source: Sandbox, count: int) -> list[Sandbox]:
    forks = source.fork(count=count, timeout=300)
    assert all(isinstance(fork, Sandbox) for fork in forks), forks
    return [fork for fork in forks if isinstance(fork, Sandbox)]


def test_a_forks_hidden_snapshot_stays_while_a_fork_lives_and_goes_with_the_last(
    gvisor_stack: tuple[Any, Path],
) -> None:
    stack, templates = gvisor_stack
    source = Sandbox.create(timeout=300)
    try:
        source.files.write("/home/user/kept.txt", "in the fork")
        before = _bytes(templates)
        first, second = _forks(source, 2)
        hidden = _fork_files(templates)
        assert len(hidden) == 3, hidden  # record, layer, memory image
        assert _bytes(templates) > before
        assert not [s for s in Sandbox.list_snapshots().next_items() if s.snapshot_id.startswith("fork-")]

        first.kill()
        time.sleep(3)  # the kill's teardown and whatever follows it
        assert _fork_files(templates) == hidden  # the other fork still runs on that layer
        assert second.files.read("/home/user/kept.txt") == "in the fork"
        second.kill()
        _wait_collected(templates)
        assert not [name for name in _listed_templates(stack) if name.startswith("fork-")]
        assert _bytes(templates) == before  # the disk the fork took is back

        # A snapshot of a fork builds on the fork's layer: that layer stays with it (its memory
        # image and hidden record need not), and goes when that snapshot is deleted.
        (fork,) = _forks(source, 1)
        fork.files.write("/home/user/fork.txt", "the fork's own")
        snapshot = fork.create_snapshot()
        fork.kill()
        deadline = time.monotonic() + 60
        while [path for path in _fork_files(templates) if not path.startswith("layers/snapshot-fork-")]:
            assert time.monotonic() < deadline, _fork_files(templates)
            time.sleep(0.2)
        assert len(_fork_files(templates)) == 1  # the layer alone
        from_snapshot = Sandbox.create(snapshot.snapshot_id, timeout=300)
        try:
            assert from_snapshot.files.read("/home/user/kept.txt") == "in the fork"
            assert from_snapshot.files.read("/home/user/fork.txt") == "the fork's own"
        finally:
            from_snapshot.kill()
        deadline = time.monotonic() + 60
        while True:  # the kill's teardown runs after its answer: the delete is refused until then
            try:
                assert Sandbox.delete_snapshot(snapshot.snapshot_id) is True
                break
            except SandboxException:
                assert time.monotonic() < deadline
                time.sleep(0.5)
        assert _fork_files(templates) == []
        assert _bytes(templates) == before
    finally:
        source.kill()


def test_a_paused_fork_keeps_it_through_a_restart_and_forks_the_restart_ended_do_not(
    gvisor_stack: tuple[Any, Path],
) -> None:
    stack, templates = gvisor_stack
    source = Sandbox.create(timeout=300)
    try:
        source.files.write("/home/user/kept.txt", "in the fork")
        paused, running = _forks(source, 2)
        running_id = running.sandbox_id
        paused.files.write("/home/user/own.txt", "written before the pause")
        paused.pause()
        hidden = _fork_files(templates)
        stack.down()  # ends the running fork (and the source); the paused one stays on disk
        stack.up()
        assert Sandbox.get_info(paused.sandbox_id).state.value == "paused"
        assert _fork_files(templates) == hidden  # the paused fork runs on that layer when resumed
        again = Sandbox.connect(paused.sandbox_id, timeout=300)
        assert again.files.read("/home/user/kept.txt") == "in the fork"
        assert again.files.read("/home/user/own.txt") == "written before the pause"
        assert running_id not in [info.sandbox_id for info in Sandbox.list().next_items()]
        again.kill()
        _wait_collected(templates)

        # With no fork left while the stack is down, its start collects the hidden snapshot.
        source = Sandbox.create(timeout=300)
        _forks(source, 1)
        assert _fork_files(templates)
        stack.down()
        stack.up()
        assert _fork_files(templates) == []
    finally:
        Sandbox.kill(source.sandbox_id)


def test_a_crash_between_the_snapshot_and_the_forks_leaves_nothing_after_the_restart(
    gvisor_stack: tuple[Any, Path],
) -> None:
    stack, templates = gvisor_stack
    source = Sandbox.create(timeout=300)
    outcome: dict[str, Any] = {}

    def fork() -> None:
        try:
            outcome["forks"] = source.fork(count=2, timeout=300)
        except Exception as exc:  # noqa: BLE001 - the service is killed under it
            outcome["error"] = exc

    supervisor = stack.service_pid("supervisor")
    assert supervisor is not None
    forking = threading.Thread(target=fork, daemon=True)
    forking.start()
    os.kill(supervisor, signal.SIGSTOP)  # nothing restarts the service until it is killed
    try:
        deadline = time.monotonic() + 120
        while not list(templates.glob("fork-*.json")):  # the snapshot is written, the forks not yet
            assert time.monotonic() < deadline and forking.is_alive(), outcome
            time.sleep(0.005)
        service = stack.service_pid("sandbox")
        assert service is not None
        os.kill(service, signal.SIGKILL)
    finally:
        os.kill(supervisor, signal.SIGCONT)
    forking.join(timeout=120)
    assert "error" in outcome, outcome  # the crash came before the forks were answered
    assert _fork_files(templates)
    stack.wait_healthy(timeout=120)
    assert _fork_files(templates) == []
    for info in Sandbox.list().next_items():
        Sandbox.kill(info.sandbox_id)


def test_a_fork_whose_sandboxes_all_fail_to_start_leaves_nothing(gvisor_stacks: Callable[..., Any]) -> None:
    with gvisor_stacks(E2B_MAX_SANDBOXES="1") as (_, templates):
        source = Sandbox.create(timeout=300)
        try:
            before = _bytes(templates)
            results = source.fork(count=2, timeout=300)
            assert len(results) == 2 and all(isinstance(result, Exception) for result in results), results
            assert "maximum number of concurrent sandboxes" in str(results[0])
            assert _fork_files(templates) == []
            assert _bytes(templates) == before
            assert source.commands.run("echo alive").stdout.strip() == "alive"
        finally:
            source.kill()
