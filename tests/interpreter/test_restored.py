"""POST /restored: what the microvm tier calls after restoring a VM whose interpreter was saved
running. Every copy of that VM starts with the same memory, so the server must give its kernels
fresh random state and message keys, keeping what they imported (that is why the VM was saved warm).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2b_code_interpreter import Sandbox

from interpreter.conftest import InterpreterServer, start_server, stop_server


@pytest.fixture()
def own_server(tmp_path: Path) -> Iterator[InterpreterServer]:
    # its own server: /restored replaces the non-Python kernels of every context
    running = start_server(tmp_path)
    try:
        yield running
    finally:
        stop_server(running)


def test_restored_reseeds_and_rekeys_python_in_place_and_replaces_other_kernels(own_server: InterpreterServer) -> None:
    sandbox: Sandbox = own_server.sandbox()
    sandbox.run_code("import random; saved = random.getstate(); kept = 42")
    key_before = sandbox.run_code("get_ipython().kernel.session.key").text
    bash = sandbox.create_code_context(language="bash")
    sandbox.run_code("LEFT=before", context=bash)
    bash_pid = sandbox.run_code("echo $PPID", context=bash).logs.stdout

    for _ in range(2):  # twice at once: the second waits for the first (one rekey at a time)
        assert httpx.post(f"{own_server.url}/restored", timeout=60).status_code == 200

    # Python: same kernel and state, new seed and session key; it still runs code
    assert sandbox.run_code("kept").text == "42"
    assert sandbox.run_code("random.getstate() != saved").text == "True"
    key_after = sandbox.run_code("get_ipython().kernel.session.key").text
    assert key_after and key_after != key_before
    assert sandbox.run_code("sum(range(10))").text == "45"
    # bash cannot be reseeded from inside: its context got a new kernel on first use
    assert sandbox.run_code("echo $PPID", context=bash).logs.stdout != bash_pid
    assert sandbox.run_code("echo ${LEFT:-gone}", context=bash).logs.stdout == ["gone\n"]
    assert "dropping an unreadable message" not in own_server.log()
