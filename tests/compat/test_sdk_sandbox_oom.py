"""envd outlives its sandbox's own OOM, is restarted when it dies anyway, and a sandbox that ends
with it is reported (issue 11 item 3), with the stock `e2b` SDK.

Commands run with a raised oom_score_adj, so when a sandbox runs out of memory the kernel kills
them, not envd, even when every one of them is smaller than envd. The sandbox's first process is the
template's envd launcher: it restarts a dead envd with the state `/init` gave it (same token, env
vars), so the sandbox stays usable. When the launcher itself dies the sandbox ends, and the API says
so (killed, reason "died", its event, an error naming the cause) within the manager's 5 s check.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import nats
import pytest
from e2b import CommandExitException, Sandbox, SandboxNotFoundException

from pmoves_e2b.events import envelope
from pmoves_e2b.events.publisher import STREAM_NAME

pytestmark = pytest.mark.stack

HOG = "import time; x = bytearray({mb} << 20); x[::4096] = b'x' * len(x[::4096]); time.sleep(30)"


def test_envd_survives_an_oom_of_many_processes_smaller_than_itself(
    stack_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = stack_factory({"E2B_SANDBOX_MEMORY_MB": "256", "E2B_POOL_SIZE": "0"})
    for name, value in stack.sdk_env.items():
        monkeypatch.setenv(name, value)
    sbx = Sandbox.create(timeout=120)
    try:
        envd = sbx.commands.run("pgrep -o -f pmoves_e2b.envd", user="root").stdout.strip()
        envd_mb = int(sbx.commands.run(f"ps -o rss= -p {envd}", user="root").stdout) // 1024
        size = max(4, envd_mb // 2)  # each hog (python + size MB) stays smaller than envd
        count = 256 // size + 4
        hogs = f'for i in $(seq {count}); do python3 -c "{HOG.format(mb=size)}" & done; wait'
        try:
            sbx.commands.run(hogs, timeout=90)
        except CommandExitException:
            pass
        assert sbx.commands.run("echo alive").stdout == "alive\n"
        assert sbx.commands.run("pgrep -o -f pmoves_e2b.envd", user="root").stdout.strip() == envd
    finally:
        sbx.kill()


def killed_events(nats_url: str, sandbox_id: str) -> list[envelope.Envelope]:
    """The `killed` events of one sandbox kept in the E2B stream."""

    async def scan() -> list[envelope.Envelope]:
        client = await nats.connect(nats_url)
        try:
            js = client.jetstream()
            subscription = await js.pull_subscribe("e2b.sandbox.killed.v1", stream=STREAM_NAME)
            found: list[envelope.Envelope] = []
            while True:
                try:
                    batch = await subscription.fetch(500, timeout=2)
                except TimeoutError:  # nats-py raises its own or, from deeper in fetch, asyncio's
                    return found
                for message in batch:
                    event = envelope.parse(message.data, message.subject)
                    if event.payload.get("sandbox_id") == sandbox_id:
                        found.append(event)
        finally:
            await client.close()

    return asyncio.run(scan())


def test_an_envd_that_died_is_restarted_and_serves_the_sandbox_as_before(sdk_env: dict[str, str]) -> None:
    sbx = Sandbox.create(timeout=300, envs={"KEPT": "yes"})
    try:
        sbx.commands.run("sleep 600 >/dev/null 2>&1 &", timeout=30)  # a command of the envd that dies
        envd = sbx.commands.run("pgrep -o -f pmoves_e2b.envd", user="root").stdout.strip()
        try:
            sbx.commands.run(f"kill -9 {envd}", user="root", timeout=10)
        except Exception:  # noqa: BLE001, S110 - the stream breaks as envd dies
            pass
        deadline = time.monotonic() + 60
        while True:
            try:
                result = sbx.commands.run("echo $KEPT; whoami", timeout=10)  # the sandbox's token, env, user
                break
            except Exception:  # noqa: BLE001 - envd is coming back
                assert time.monotonic() < deadline, "envd was not restarted"
                time.sleep(0.5)
        assert result.stdout == "yes\nuser\n"
        assert sbx.commands.run("pgrep -o -f pmoves_e2b.envd", user="root").stdout.strip() != envd
        assert "sleep 600" in sbx.commands.run("ps -eo args", user="root").stdout  # its command lives on
        time.sleep(6)  # one pass of the manager's check: a restarted envd is no dead sandbox
        assert sbx.is_running()
        assert any(info.sandbox_id == sbx.sandbox_id for info in Sandbox.list(limit=100).next_items())
    finally:
        sbx.kill()


ENVD = "^/usr/bin/python3 -m pmoves_e2b.envd"
LAUNCHER = "^/bin/sh /opt/pmoves/bin/envd"
# envd dies 3 times in a row: the launcher gives up and ends every process of the sandbox
KEEPS_DYING = f'for i in 1 2 3; do until p=$(pgrep -f "{ENVD}"); do sleep 0.1; done; kill -9 $p; sleep 0.3; done'
# the launcher, then envd: nothing restarts envd while a command lives on (the port refuses)
GONE_WITH_PROCESSES_LEFT = f'sleep 600 & kill -9 $(pgrep -f "{LAUNCHER}"); sleep 0.5; kill -9 $(pgrep -f "{ENVD}")'


@pytest.mark.parametrize("attack", [KEEPS_DYING, GONE_WITH_PROCESSES_LEFT], ids=["keeps-dying", "processes-left"])
def test_a_sandbox_whose_envd_died_is_reported_and_removed(
    running_stack: Any, sdk_env: dict[str, str], attack: str
) -> None:
    sbx = Sandbox.create(timeout=300)
    try:
        try:
            sbx.commands.run(f"nohup sh -c '{attack}' >/dev/null 2>&1 &", user="root", timeout=30)
        except Exception:  # noqa: BLE001, S110 - the attack may kill envd before this command's stream ends
            pass
        deadline = time.monotonic() + 60
        while any(info.sandbox_id == sbx.sandbox_id for info in Sandbox.list(limit=100).next_items()):
            assert time.monotonic() < deadline, "the API still lists a sandbox whose envd is dead"
            time.sleep(0.5)
        with pytest.raises(Exception, match="envd died"):  # the data plane says why, not only "not found"
            sbx.commands.run("echo hello", timeout=10)
        with pytest.raises(SandboxNotFoundException):  # the SDK words its own 404s
            Sandbox.get_info(sbx.sandbox_id)
        answer = httpx.get(
            f"{sdk_env['E2B_API_URL']}/sandboxes/{sbx.sandbox_id}", headers={"X-API-Key": sdk_env["E2B_API_KEY"]}
        )
        assert answer.status_code == 404 and "envd died" in answer.json()["message"]
        deadline = time.monotonic() + 30  # the outbox relay publishes after the state change
        while not (events := killed_events(running_stack.nats_url, sbx.sandbox_id)):
            assert time.monotonic() < deadline, "no killed event in the E2B stream"
        [event] = events
        assert event.payload["reason"] == "died"
    finally:
        try:
            sbx.kill()
        except Exception:  # noqa: BLE001, S110 - already removed
            pass
