"""Kernels and the server talk over Unix sockets in a private directory: no TCP port of a kernel is
open in the sandbox (any of its users could reach one), and gVisor can checkpoint them."""

from __future__ import annotations

import os
from pathlib import Path

from e2b_code_interpreter import Sandbox

from interpreter.conftest import InterpreterServer, descendants


def _tcp_inodes() -> set[str]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            inodes.add(line.split()[9])
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    inodes: set[str] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def test_python_and_bash_kernels_hold_no_tcp_socket(server: InterpreterServer, sandbox: Sandbox) -> None:
    assert sandbox.run_code("40 + 2").text == "42"
    bash = sandbox.create_code_context(language="bash")
    assert "hi" in "".join(sandbox.run_code("echo hi", context=bash).logs.stdout)
    kernels = [pid for pid, _ in descendants(server.process.pid)]
    assert kernels
    tcp = _tcp_inodes()
    held = {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:80] for pid in kernels if _socket_inodes(pid) & tcp}
    assert not held, f"kernel processes with TCP sockets: {held}"  # so no channel to them is TCP either
    sandbox.remove_code_context(bash)


def test_output_of_a_forked_child_reaches_the_cell(sandbox: Sandbox) -> None:
    code = (
        "import multiprocessing as mp\n"
        "def child(i):\n"
        "    print(f'child {i}', flush=True)\n"
        "procs = [mp.get_context('fork').Process(target=child, args=(i,)) for i in range(2)]\n"
        "for p in procs: p.start()\n"
        "for p in procs: p.join()\n"
    )
    execution = sandbox.run_code(code)
    assert execution.error is None
    printed = "".join(execution.logs.stdout)
    assert "child 0" in printed and "child 1" in printed
