"""The SDK's own debug mode (``E2B_DEBUG=true`` → envd at localhost:49983), unmodified."""

from __future__ import annotations

import fcntl
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2b import AsyncSandbox, Sandbox

from envd.conftest import RunningEnvd, start_envd, stop_envd

DEBUG_PORT = 49983
LOCK_FILE = Path("/tmp/pmoves-e2b-envd-49983.lock")


@pytest.fixture
def envd_on_debug_port(envd_user: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningEnvd]:
    with LOCK_FILE.open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pytest.skip("another test run holds port 49983")
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", DEBUG_PORT))
            except OSError:
                pytest.skip("port 49983 is busy")
        running = start_envd(envd_user, port=DEBUG_PORT)
        for name in ("E2B_SANDBOX_URL", "E2B_API_URL", "E2B_DOMAIN"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("E2B_DEBUG", "true")
        monkeypatch.setenv("E2B_API_KEY", "e2b_debug")
        try:
            yield running
        finally:
            stop_envd(running)


def test_sync_sdk_in_debug_mode(envd_on_debug_port: RunningEnvd) -> None:
    sandbox = Sandbox.create()
    assert sandbox.is_running()
    assert sandbox.commands.run("echo debug").stdout == "debug\n"
    sandbox.files.write("debug.txt", "d")
    assert sandbox.files.read("debug.txt") == "d"
    assert sandbox.commands.run("whoami").stdout.strip() == envd_on_debug_port.user


@pytest.mark.anyio
async def test_async_sdk_in_debug_mode(envd_on_debug_port: RunningEnvd) -> None:
    sandbox = await AsyncSandbox.create()
    assert (await sandbox.commands.run("echo async-debug")).stdout == "async-debug\n"
