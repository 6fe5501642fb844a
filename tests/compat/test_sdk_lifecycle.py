"""The stock `e2b` SDK (2.63.0) against the running stack: lifecycle of sandboxes.

Nothing here talks to our code except through the SDK, configured the way a user would
configure it: E2B_API_KEY, E2B_API_URL and E2B_SANDBOX_URL.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from e2b import AsyncSandbox, PtySize, Sandbox, SandboxQuery, SandboxState
from e2b.exceptions import NotFoundException, SandboxException, TimeoutException

pytestmark = pytest.mark.stack


def wait_until(predicate, timeout: float, interval: float = 0.2):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def test_create_with_metadata_envs_and_timeout_is_visible_in_info(sdk_env: dict[str, str]) -> None:
    sbx = Sandbox.create(metadata={"owner": "compat", "case": "meta"}, envs={"GREETING": "hello"}, timeout=120)
    try:
        info = sbx.get_info()
        assert info.sandbox_id == sbx.sandbox_id
        assert info.metadata == {"owner": "compat", "case": "meta"}
        assert info.template_id == "base"
        assert info.state == SandboxState.RUNNING
        assert 100 <= (info.end_at - info.started_at).total_seconds() <= 121
        result = sbx.commands.run("echo $GREETING from $(whoami) in $(pwd)")
        assert result.stdout.strip() == "hello from user in /home/user"
    finally:
        assert sbx.kill() is True


def test_kill_twice_returns_false_and_unknown_ids_are_not_found(sdk_env: dict[str, str]) -> None:
    sbx = Sandbox.create(timeout=60)
    assert sbx.is_running()
    assert sbx.kill() is True
    assert Sandbox.kill(sbx.sandbox_id) is False
    assert not sbx.is_running()
    with pytest.raises(NotFoundException):
        Sandbox.connect("doesnotexist0000000")
    with pytest.raises(NotFoundException):
        Sandbox.get_info("doesnotexist0000000")


def test_killing_a_sandbox_ends_the_streams_of_its_running_commands_and_says_so(sdk_env: dict[str, str]) -> None:
    """E2B's own python-sdk test_kill_sandbox_while_command_is_running, and the same for a PTY: a
    waiting client learns the sandbox was killed instead of waiting out its timeout (on gvisor the
    sentry dies without closing its connections, so nothing else ends them)."""
    sbx = Sandbox.create(timeout=120)
    command = sbx.commands.run("sleep 60", background=True, timeout=30)
    pty = sbx.pty.create(PtySize(rows=24, cols=80), timeout=30)
    sbx.kill()
    for handle in (command, pty):
        with pytest.raises(TimeoutException) as ended:
            handle.wait()
        assert "sandbox was killed or reached its end of life" in str(ended.value)


def test_unknown_template_is_a_clear_error(sdk_env: dict[str, str]) -> None:
    with pytest.raises(SandboxException, match="not built|not found"):
        Sandbox.create(template="no-such-template", timeout=30)


def test_list_filters_by_metadata_and_state_and_pages(sdk_env: dict[str, str]) -> None:
    tag = f"list-{time.monotonic_ns()}"
    boxes = [Sandbox.create(metadata={"suite": tag, "n": str(i)}, timeout=120) for i in range(3)]
    try:
        boxes[0].pause()
        query = SandboxQuery(metadata={"suite": tag})
        everything = Sandbox.list(query=query, limit=2)
        first = everything.next_items()
        assert len(first) == 2 and everything.has_next
        second = everything.next_items()
        assert {s.sandbox_id for s in first + second} == {b.sandbox_id for b in boxes}
        assert not everything.has_next
        running = Sandbox.list(query=SandboxQuery(metadata={"suite": tag}, state=[SandboxState.RUNNING])).next_items()
        assert {s.sandbox_id for s in running} == {b.sandbox_id for b in boxes[1:]}
        paused = Sandbox.list(query=SandboxQuery(metadata={"suite": tag}, state=[SandboxState.PAUSED])).next_items()
        assert [s.sandbox_id for s in paused] == [boxes[0].sandbox_id]
        assert (
            Sandbox.list(query=SandboxQuery(metadata={"suite": tag, "n": "2"})).next_items()[0].sandbox_id
            == boxes[2].sandbox_id
        )
    finally:
        for b in boxes:
            Sandbox.kill(b.sandbox_id)


def test_list_is_newest_first_filters_by_start_and_pages_stably(sdk_env: dict[str, str]) -> None:
    """Issue 12 item 6: E2B's spec lists newest first; startedAfter/startedBefore are honoured; a
    sandbox created between two pages neither repeats nor hides one already listed."""
    tag = f"order-{time.monotonic_ns()}"
    boxes = []
    try:
        for i in range(3):
            boxes.append(Sandbox.create(metadata={"suite": tag, "n": str(i)}, timeout=120))
            time.sleep(0.05)
        created = [b.sandbox_id for b in boxes]
        query = SandboxQuery(metadata={"suite": tag})
        assert [s.sandbox_id for s in Sandbox.list(query=query).next_items()] == created[::-1]
        oldest_first = Sandbox.list(query=query, order="asc").next_items()
        assert [s.sandbox_id for s in oldest_first] == created
        after_first = SandboxQuery(metadata={"suite": tag}, started_after=oldest_first[1].started_at)
        assert [s.sandbox_id for s in Sandbox.list(query=after_first).next_items()] == created[:0:-1]
        pages = Sandbox.list(query=query, limit=2)
        first = [s.sandbox_id for s in pages.next_items()]
        boxes.append(Sandbox.create(metadata={"suite": tag, "n": "late"}, timeout=120))
        rest = [s.sandbox_id for s in pages.next_items()]
        assert first + rest == created[::-1] and not pages.has_next
        api = {"X-API-KEY": sdk_env["E2B_API_KEY"]}
        before = httpx.get(
            f"{sdk_env['E2B_API_URL']}/v2/sandboxes",
            params={"metadata": f"suite={tag}", "startedBefore": oldest_first[0].started_at.isoformat()},
            headers=api,
            timeout=30,
        )
        assert [s["sandboxID"] for s in before.json()] == created[:1]
        bad = httpx.get(f"{sdk_env['E2B_API_URL']}/v2/sandboxes", params={"order": "sideways"}, headers=api, timeout=30)
        assert bad.status_code == 400 and "order" in bad.json()["message"]
    finally:
        for b in boxes:
            Sandbox.kill(b.sandbox_id)


def test_set_timeout_moves_the_end_and_expiry_kills(sdk_env: dict[str, str]) -> None:
    sbx = Sandbox.create(timeout=60)
    try:
        sbx.set_timeout(2)
        assert wait_until(lambda: not sbx.is_running(), timeout=20), "sandbox outlived its timeout"
        with pytest.raises(NotFoundException):
            sbx.get_info()
    finally:
        Sandbox.kill(sbx.sandbox_id)


def test_pause_freezes_and_connect_resumes_with_state_kept(sdk_env: dict[str, str]) -> None:
    sbx = Sandbox.create(timeout=120)
    try:
        sbx.files.write("/home/user/state.txt", "kept", metadata={"state": "kept"})
        counter = sbx.commands.run(
            # written whole by a rename: a read never lands between the truncate and the write
            "i=0; while true; do i=$((i+1)); echo $i > /tmp/n.new; mv /tmp/n.new /tmp/n; sleep 0.05; done",
            background=True,
        )
        assert wait_until(lambda: sbx.files.exists("/tmp/n"), 30), "the counter never started"  # slow under gVisor
        boot_id = sbx.files.read("/proc/sys/kernel/random/boot_id")
        assert sbx.pause() is True
        assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED
        assert sbx.pause() is False  # already paused: 409 -> False
        resumed = Sandbox.connect(sbx.sandbox_id)
        first = int(resumed.files.read("/tmp/n"))
        assert wait_until(lambda: int(resumed.files.read("/tmp/n")) > first, 30), "processes did not run after resume"
        assert resumed.files.read("/home/user/state.txt") == "kept"
        assert resumed.files.get_info("/home/user/state.txt").metadata == {"state": "kept"}
        # a memory resume is no reboot (E2B's test_keep_memory_none_defaults_to_full_memory; gvisor
        # restores to a new sandbox dir, which had a new id)
        assert resumed.files.read("/proc/sys/kernel/random/boot_id") == boot_id
        assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.RUNNING
        counter.kill()
    finally:
        Sandbox.kill(sbx.sandbox_id)


def test_get_metrics_reports_memory_and_disk(sdk_env: dict[str, str]) -> None:
    sbx = Sandbox.create(timeout=60)
    try:
        metrics = sbx.get_metrics()
        assert metrics, "no metrics"
        last = metrics[-1]
        assert last.mem_total > 0 and 0 < last.mem_used <= last.mem_total
        assert last.disk_total > 0
        assert last.cpu_count >= 1
    finally:
        sbx.kill()


def test_async_sandbox_runs_commands_concurrently(sdk_env: dict[str, str]) -> None:
    async def main() -> list[str]:
        boxes = await asyncio.gather(*(AsyncSandbox.create(timeout=60) for _ in range(3)))
        try:
            results = await asyncio.gather(*(b.commands.run(f"echo box{i}") for i, b in enumerate(boxes)))
            return [r.stdout.strip() for r in results]
        finally:
            await asyncio.gather(*(b.kill() for b in boxes))

    assert asyncio.run(main()) == ["box0", "box1", "box2"]


def test_auto_paused_sandbox_resumes_with_a_fresh_timeout(sdk_env: dict[str, str]) -> None:
    sbx = Sandbox.create(timeout=2, lifecycle={"on_timeout": "pause"})
    try:
        assert wait_until(lambda: Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED, timeout=20)
        again = Sandbox.connect(sbx.sandbox_id)
        time.sleep(1.5)  # the reaper must not pause it again at once
        assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.RUNNING
        assert again.commands.run("echo back").stdout == "back\n"
    finally:
        Sandbox.kill(sbx.sandbox_id)
