"""The embedded nats-server is closed: generated credentials, per-service permissions, no anonymous clients.

Runs the real server with the arguments the supervisor uses (``embedded.server_args``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats
import pytest
from events.embedded_nats import EmbeddedNats
from events.nats_client import synced
from nats.aio.client import Client

from pmoves_e2b.config import Settings, ensure_secrets, load_settings
from pmoves_e2b.events.connection import connect, server_url
from pmoves_e2b.events.embedded import CLIENT_USER, SERVICE_USERS, client_url, config_path, password
from pmoves_e2b.events.publisher import STREAM_NAME, EventPublisher, ensure_stream


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    embedded = EmbeddedNats(tmp_path)
    embedded.start()
    try:
        yield embedded
    finally:
        embedded.stop()


@pytest.fixture()
def embedded(server: EmbeddedNats) -> Settings:
    return server.settings


async def _refusal(url: str) -> str:
    try:
        client = await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)
    except Exception as exc:  # noqa: BLE001 - any refusal; the message is checked
        return str(exc) or type(exc).__name__
    await client.close()
    return ""


@asynccontextmanager
async def as_user(settings: Settings, user: str) -> AsyncIterator[tuple[Client, list[str]]]:
    """A client logged in as ``user``; the list collects the server's errors (permission violations)."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    client = await nats.connect(client_url(settings, user), error_cb=on_error)
    try:
        yield client, errors
    finally:
        await client.close()


async def _received(client: Client, subject: str) -> list[Any]:
    got: list[Any] = []

    async def collect(msg: Any) -> None:
        got.append(msg)

    await client.subscribe(subject, cb=collect)
    await synced(client)
    return got


def test_anonymous_and_wrong_credentials_are_refused(embedded: Settings) -> None:
    port = embedded.e2b_nats_port

    async def scenario() -> None:
        assert "Authorization Violation" in await _refusal(f"nats://127.0.0.1:{port}")
        assert "Authorization Violation" in await _refusal(f"nats://{CLIENT_USER}:wrong@127.0.0.1:{port}")
        # A service's password is not the secret: knowing one user's password gives no other user.
        sandbox_pw = password(embedded, "e2b-sandbox")
        assert "Authorization Violation" in await _refusal(f"nats://e2b-desktop:{sandbox_pw}@127.0.0.1:{port}")
        assert await _refusal(client_url(embedded, CLIENT_USER)) == ""
        for user in SERVICE_USERS:
            assert await _refusal(client_url(embedded, user)) == ""

    asyncio.run(scenario())
    conf = config_path(embedded)
    assert conf.stat().st_mode & 0o777 == 0o600
    assert conf.parent.stat().st_mode & 0o777 == 0o700


def test_each_user_may_do_its_job_and_nothing_more(server: EmbeddedNats, embedded: Settings) -> None:
    async def scenario() -> None:
        async with (
            as_user(embedded, CLIENT_USER) as (pmoves, pmoves_errors),
            as_user(embedded, "e2b-mcp-server") as (spells, spells_errors),
            as_user(embedded, "e2b-surf") as (surf, surf_errors),
        ):
            events = await _received(pmoves, "e2b.>")

            answered: list[str] = []

            async def answer(msg: Any) -> None:
                answered.append(msg.reply)
                await msg.respond(b"done")

            await spells.subscribe("e2b.spell.execute.v1", queue="spells", cb=answer)
            await synced(spells)
            # PMOVES' publisher requests a spell and the spell service answers it. On failure, say
            # which side stopped: the request never arrived, or the answer was refused or lost.
            try:
                reply = await pmoves.request("e2b.spell.execute.v1", b"{}", timeout=5)
            except TimeoutError:  # nats-py's own or asyncio's
                pytest.fail(
                    f"no answer: responder got {answered!r}; responder errors {spells_errors!r}; "
                    f"client errors {pmoves_errors!r}; server log: {server.log()}"
                )
            assert reply.data == b"done"
            # No user forges another's events: a client cannot publish a lifecycle event,
            # surf cannot request spells, surf cannot listen to spell requests.
            await pmoves.publish("e2b.sandbox.created.v1", b"forged")
            await surf.publish("e2b.spell.execute.v1", b"forged")
            await surf.publish("e2b.surf.completed.v1", b"{}")  # its own subject is fine
            await surf.subscribe("e2b.spell.execute.v1")
            await synced(pmoves)
            await synced(surf)
            await asyncio.sleep(0.3)
            subjects = [m.subject for m in events]
            assert "e2b.sandbox.created.v1" not in subjects
            assert subjects.count("e2b.spell.execute.v1") == 1  # only the real request
            assert "e2b.surf.completed.v1" in subjects
            assert any('permissions violation for publish to "e2b.sandbox.created.v1"' in e for e in pmoves_errors)
            assert any('permissions violation for publish to "e2b.spell.execute.v1"' in e for e in surf_errors)
            assert any('permissions violation for subscription to "e2b.spell.execute.v1"' in e for e in surf_errors)

    asyncio.run(scenario())


def test_services_keep_the_stream_and_the_client_reads_it_but_cannot_delete_it(embedded: Settings) -> None:
    async def scenario() -> None:
        connection = connect(embedded, "e2b-sandbox")
        connection.on_connect(ensure_stream)
        try:
            assert await connection.wait_connected(timeout=10)
            await ensure_stream(connection.client)
            sent = await EventPublisher(connection, "e2b-sandbox").publish_lifecycle("created", "sbx-a", "base", {})
            assert sent is not None
            async with as_user(embedded, CLIENT_USER) as (pmoves, _):
                js = pmoves.jetstream(timeout=5)
                subscription = await js.pull_subscribe("e2b.sandbox.>", durable="reader", stream=STREAM_NAME)
                [message] = await subscription.fetch(1, timeout=5)
                assert message.subject == "e2b.sandbox.created.v1"
                await message.ack()
                with pytest.raises(nats.errors.Error):
                    await js.delete_stream(STREAM_NAME)
            assert (await connection.client.jetstream().stream_info(STREAM_NAME)).config.name == STREAM_NAME
        finally:
            await connection.close()

    asyncio.run(scenario())


def test_the_secret_is_generated_private_and_read_from_its_file_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("E2B_NATS_PASSWORD", raising=False)
    monkeypatch.delenv("NATS_URL", raising=False)
    settings = load_settings(e2b_data_dir=tmp_path / "data")
    paths = ensure_secrets(settings)
    generated = paths["E2B_NATS_PASSWORD"]
    assert generated is not None and generated.stat().st_mode & 0o777 == 0o600
    assert len(generated.read_text().strip()) == 64
    reread = load_settings(e2b_data_dir=tmp_path / "data")
    assert server_url(reread, "e2b-sandbox") == client_url(reread, "e2b-sandbox")
    assert f"pmoves:{generated.read_text().strip()}@" in server_url(reread, "some-cli")
    given = tmp_path / "nats-password"
    given.write_text("from-a-file\n")
    monkeypatch.setenv("E2B_NATS_PASSWORD_FILE", str(given))
    from_file = load_settings(e2b_data_dir=tmp_path / "data")
    assert password(from_file, CLIENT_USER) == "from-a-file"
    assert "from-a-file" not in repr(from_file)
    # With NATS_URL the external server's credentials are used as given.
    monkeypatch.setenv("NATS_URL", "nats://u:p@nats:4222")
    assert server_url(load_settings(e2b_data_dir=tmp_path / "data"), "e2b-sandbox") == "nats://u:p@nats:4222"


@pytest.mark.stack
def test_the_running_stack_refuses_anonymous_clients_and_its_services_log_in(running_stack: Any) -> None:
    port = running_stack.ports["nats"]
    assert "Authorization Violation" in asyncio.run(_refusal(f"nats://127.0.0.1:{port}"))
    assert asyncio.run(_refusal(running_stack.nats_url)) == ""  # user pmoves, the documented way in
    for key in ("sandbox", "mcp", "surf", "desktop"):
        running_stack.wait_healthy(key, timeout=60)
        deadline = time.monotonic() + 30
        while running_stack.health(key)[1]["dependencies"]["nats"] != "connected":
            assert time.monotonic() < deadline, f"{key} never logged in to NATS"
            time.sleep(0.2)
    secret = (running_stack.data_dir / "secrets" / "E2B_NATS_PASSWORD").read_text().strip()
    assert (running_stack.data_dir / "secrets" / "E2B_NATS_PASSWORD").stat().st_mode & 0o777 == 0o600
    logs = "".join(running_stack.log(c) for c in ("supervisor", "nats", "sandbox", "mcp", "surf", "desktop"))
    assert secret not in logs and password(load_settings(e2b_nats_password=secret), "e2b-sandbox") not in logs
