"""The stock npm SDKs (pinned), installed once from the npm registry into a cache directory."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

NPM_E2B_VERSION = "2.51.0"
NPM_CODE_INTERPRETER_VERSION = "2.8.0"
CACHE = Path(f"/var/cache/pmoves-e2b/npm-e2b-{NPM_E2B_VERSION}-ci-{NPM_CODE_INTERPRETER_VERSION}")


@pytest.fixture(scope="session")
def npm_e2b() -> Path:
    """A directory whose node_modules has `e2b` and `@e2b/code-interpreter`: scripts written
    beside it import them as a user's would."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed for the JS SDK tests (apt install nodejs npm)")
    if not (CACHE / "node_modules/@e2b/code-interpreter/package.json").exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                "npm",
                "install",
                "--no-audit",
                "--no-fund",
                "--save-exact",
                f"e2b@{NPM_E2B_VERSION}",
                f"@e2b/code-interpreter@{NPM_CODE_INTERPRETER_VERSION}",
            ],
            cwd=CACHE,
            check=True,
            capture_output=True,
            timeout=600,
        )
    return CACHE
