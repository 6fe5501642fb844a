"""Fixtures of the gVisor checkpoint and fork suites: gvisor-default stacks with their own templates
dir (snapshots and forks are written there), the shared templates' layers linked in."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from stack.harness import SHARED_TEMPLATES_DIR

from tests.compat.private_templates import private_templates_stack

GvisorStacks = Callable[..., contextlib.AbstractContextManager[tuple[Any, Path]]]


class _SharedTemplates:
    """Stands in for the running stack whose templates ``private_templates_stack`` links."""

    settings_env = {"E2B_TEMPLATES_DIR": str(SHARED_TEMPLATES_DIR)}


@pytest.fixture()
def gvisor_stacks(stack_factory: Any, tmp_path: Path) -> GvisorStacks:
    """``gvisor_stacks(**env)``: a context manager giving (stack, templates dir) of a new gvisor stack."""

    def open_stack(**extra_env: str) -> contextlib.AbstractContextManager[tuple[Any, Path]]:
        return private_templates_stack(
            stack_factory, _SharedTemplates(), tmp_path / "templates", E2B_ISOLATION="gvisor", **extra_env
        )

    return open_stack


@pytest.fixture()
def gvisor_stack(gvisor_stacks: GvisorStacks) -> Iterator[tuple[Any, Path]]:
    with gvisor_stacks() as found:
        yield found
