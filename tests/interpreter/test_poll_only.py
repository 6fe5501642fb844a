"""The interpreter's claim on the gvisor tier (poll_only.py): present while no kernel of it speaks TCP,
withdrawn before one starts, and back only once that kernel's TCP sockets are closed."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pmoves_e2b.interpreter import poll_only


@pytest.fixture()
def claims(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setattr(poll_only, "CLAIM_DIR", tmp_path)
    monkeypatch.setattr(poll_only, "_tcp_kernels", 0)
    assert poll_only.enable_where_asked()
    yield tmp_path
    monkeypatch.setattr(poll_only, "_enabled", False)


def _stat_start_time() -> str:
    return Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]


def test_the_claim_names_this_process_start_and_goes_while_a_tcp_kernel_runs(claims: Path) -> None:
    poll_only.claim()
    files = list(claims.iterdir())
    assert len(files) == 1 and files[0].read_text() == _stat_start_time()
    poll_only.tcp_kernel_starting()
    assert not list(claims.iterdir())


def test_the_claim_comes_back_only_once_the_kernels_loopback_sockets_are_closed(tmp_path: Path) -> None:
    """In a process of its own, as the server is: this one holds the session's SDK connections."""
    scenario = f"""
import asyncio, socket
from pathlib import Path
from pmoves_e2b.interpreter import poll_only
poll_only.CLAIM_DIR = Path({str(tmp_path)!r})
assert poll_only.enable_where_asked()

async def main():
    poll_only.tcp_kernel_starting()
    with socket.create_server(("127.0.0.1", 0)) as server:
        channel = socket.create_connection(server.getsockname())  # a kernel channel libzmq has not closed yet
        peer, _ = server.accept()
        poll_only.tcp_kernel_ended()
        await asyncio.sleep(0.5)
        print("while open:", bool(list(poll_only.CLAIM_DIR.iterdir())))
        channel.close()
        peer.close()
    await asyncio.sleep(0.5)
    print("after:", bool(list(poll_only.CLAIM_DIR.iterdir())))

asyncio.run(main())
"""
    ran = subprocess.run([sys.executable, "-c", scenario], capture_output=True, text=True, timeout=60, check=True)
    assert ran.stdout.split("\n")[:2] == ["while open: False", "after: True"], ran.stdout + ran.stderr
