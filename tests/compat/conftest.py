"""Fixtures of the compat suite: one sandbox per module (on each tier the module runs on), the stock
npm SDKs (pinned, installed once from the npm registry into a cache directory), a private templates
dir for template builds, a loopback OCI registry."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from compat.oci_registry import Registry, running_registry, tools_missing
from compat.private_templates import private_templates_stack
from e2b import Sandbox

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


@pytest.fixture()
def own_templates(stack_factory: Any, running_stack: Any, tmp_path: Path) -> Iterator[Path]:
    """A stack whose templates dir is private, so builds write only there."""
    with private_templates_stack(stack_factory, running_stack, tmp_path / "templates") as (_, templates):
        yield templates


@pytest.fixture()
def registry(tmp_path: Path) -> Iterator[Registry]:
    """Debian's docker-registry on loopback, with a password."""
    if tools_missing():
        pytest.skip("needs docker-registry, skopeo and umoci (apt-get install docker-registry skopeo umoci)")
    (tmp_path / "registry").mkdir()
    with running_registry(tmp_path / "registry") as running:
        yield running


@pytest.fixture(scope="module")
def sbx(running_stack: Any) -> Iterator[Sandbox]:
    """A sandbox of the stock SDK the module's tests share (module-scoped: one create per module)."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in running_stack.sdk_env.items():
            patch.setenv(name, value)
        box = Sandbox.create(timeout=600)
        yield box
        box.kill()
