"""A custom template kept warm (E2B_POOL_TEMPLATES): its start and ready commands ran before a create
claims the sandbox, and a rebuild replaces the warm sandboxes of the old build."""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from compat.private_templates import private_templates_stack
from e2b import Sandbox, Template, wait_for_file

pytestmark = pytest.mark.stack

NAME = f"pooled-{uuid.uuid4().hex[:8]}"


def _template(version: str) -> Any:
    return (
        Template()
        .from_template("base")
        .run_cmd(f"echo {version} > /home/user/version.txt")
        .set_start_cmd("date +%s.%N > /tmp/booted-at; sleep infinity", wait_for_file("/tmp/booted-at"))
    )


def _metric(stack: Any, name: str) -> float:
    text = httpx.get(f"{stack.sandbox_url}/metrics").text
    found = re.search(rf'^{name}\{{template="{NAME}"\}} ([0-9.e+]+)$', text, re.M)
    return float(found[1]) if found else 0.0


def _wait_warm(stack: Any) -> None:
    deadline = time.monotonic() + 90
    while _metric(stack, "e2b_sandbox_pool_ready") < 1:
        assert time.monotonic() < deadline, "the custom template was never pooled"
        time.sleep(0.5)


def test_a_custom_template_in_e2b_pool_templates_is_booted_ahead(
    stack_factory: Any, running_stack: Any, tmp_path: Path
) -> None:
    with private_templates_stack(
        stack_factory, running_stack, tmp_path / "templates", E2B_POOL_SIZE="1", E2B_POOL_TEMPLATES=NAME
    ) as (stack, _):
        Template.build(_template("one"), NAME)
        _wait_warm(stack)
        asked = time.time()
        sandbox = Sandbox.create(template=NAME, timeout=60)
        try:
            booted = float(sandbox.files.read("/tmp/booted-at"))
            assert booted < asked, "the start command ran after the create was asked: not a warm sandbox"
            assert sandbox.files.read("/home/user/version.txt").strip() == "one"
        finally:
            sandbox.kill()
        assert _metric(stack, "e2b_sandbox_pool_hits_total") == 1

        # A new build: the warm sandbox of the old one is let go, the next one is of the new build.
        Template.build(_template("two"), NAME)
        time.sleep(1)
        _wait_warm(stack)
        sandbox = Sandbox.create(template=NAME, timeout=60)
        try:
            assert sandbox.files.read("/home/user/version.txt").strip() == "two"
        finally:
            sandbox.kill()
