"""Per isolation tier, through the stock SDKs: what the tier changes (whose kernel serves the
sandbox's syscalls) and that the code interpreter works in it. Runs once per tier this machine can
run (tests/conftest.py TIERED_MODULES)."""

from __future__ import annotations

from pathlib import Path

import pytest
from e2b import Sandbox
from e2b_code_interpreter import Sandbox as CodeSandbox

pytestmark = pytest.mark.stack


def test_the_kernel_inside_is_the_tiers(sdk_env: dict[str, str], tier: str) -> None:
    sbx = Sandbox.create(timeout=120)
    try:
        version = sbx.commands.run("cat /proc/version").stdout
        dmesg = sbx.commands.run("dmesg 2>&1 || true", user="root").stdout
        if tier == "ns":  # namespaces share the host's kernel, but not its log
            assert version == Path("/proc/version").read_text()
            assert "gVisor" not in dmesg
        else:
            assert version != Path("/proc/version").read_text(), version
        if tier == "gvisor":
            assert "gVisor" in dmesg, dmesg
        assert sbx.commands.run("ls -ld /home/user").stdout.split()[2] == "user"
    finally:
        sbx.kill()


def test_code_interpreter_keeps_state_between_cells(sdk_env: dict[str, str], tier: str) -> None:
    sbx = CodeSandbox.create(timeout=300)
    try:
        sbx.run_code("x = 41", timeout=120)
        assert sbx.run_code("x + 1", timeout=120).text == "42"
        assert sbx.run_code("print('out')").logs.stdout == ["out\n"]
    finally:
        sbx.kill()
