"""envd outlives its sandbox's own OOM (issue 11 item 3), with the stock `e2b` SDK.

Commands run with a raised oom_score_adj, so when a sandbox runs out of memory the kernel kills
them, not envd, even when every one of them is smaller than envd.
"""

from __future__ import annotations

from typing import Any

import pytest
from e2b import CommandExitException, Sandbox

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
