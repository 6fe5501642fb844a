"""A stack whose templates dir is private (the shared build's layers linked in, its records copied),
so custom template builds write only there. Used by the template tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from stack.harness import link_shared_templates


@contextmanager
def private_templates_stack(
    stack_factory: Callable[..., Any], running_stack: Any, where: Path, **extra_env: str
) -> Iterator[tuple[Any, Path]]:
    """(stack, templates dir); the SDK's environment points at that stack meanwhile."""
    shared = Path(running_stack.settings_env["E2B_TEMPLATES_DIR"])
    link_shared_templates(shared, where)
    stack = stack_factory(extra_env={"E2B_TEMPLATES_DIR": str(where), "E2B_POOL_SIZE": "0", **extra_env})
    with pytest.MonkeyPatch.context() as patch:
        for name, value in stack.sdk_env.items():
            patch.setenv(name, value)
        yield stack, where
