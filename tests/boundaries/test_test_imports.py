"""Test helpers are imported one way: by their directory under tests/ (``from stack.harness import
free_ports``, ``from isolation.ns_harness import Sandboxes``).

A bare ``from ns_harness import`` works only once pytest has put that directory on sys.path (so it
depends on which tests ran first), and it loads a second copy of the module next to the qualified
one: two sets of module state. Relative imports (``from .conftest``) are the same module under
another spelling; the qualified one is used everywhere.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def helper_modules() -> dict[str, str]:
    """Bare name -> directory-qualified name of every helper module in a tests/ subdirectory."""
    helpers = {}
    for path in TESTS.glob("*/*.py"):
        if not path.name.startswith("test_") and path.name not in ("conftest.py", "__init__.py"):
            helpers[path.stem] = f"{path.parent.name}.{path.stem}"
    return helpers


def unqualified_helper_imports() -> list[str]:
    helpers = helper_modules()
    found = []
    for path in sorted(TESTS.rglob("*.py")):
        where = path.relative_to(TESTS)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                found.append(f"{where}:{node.lineno}: relative import from {'.' * node.level}{node.module or ''}")
            elif isinstance(node, ast.ImportFrom) and node.module in helpers:
                found.append(f"{where}:{node.lineno}: from {node.module} (use {helpers[node.module]})")
            elif isinstance(node, ast.Import):
                found += [
                    f"{where}:{node.lineno}: import {alias.name} (use {helpers[alias.name]})"
                    for alias in node.names
                    if alias.name in helpers
                ]
    return found


def test_test_helpers_are_imported_by_their_directory() -> None:
    assert helper_modules(), "found no test helpers"
    assert unqualified_helper_imports() == []
