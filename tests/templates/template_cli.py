"""`pmoves-e2b template ...` run as a user would, in a child process."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping


def template_cli(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """The CLI's answer to ``template ARGS`` (wide COLUMNS: its tables are not cut)."""
    return subprocess.run(
        [sys.executable, "-m", "pmoves_e2b.cli", "template", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**(env if env is not None else os.environ), "COLUMNS": "200"},
    )
