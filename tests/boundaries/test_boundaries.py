"""Layer rules, checked on the source (no stack, no root): they fail the moment a change breaks them.

- The host imports from envd only what ``pmoves_e2b.envd`` exports.
- Code that runs inside sandboxes (envd, interpreter) imports nothing from the host packages.
- Every plain HTTP path envd's router serves is classified client or host-only, and the proxy
  refuses every host-only one, so a new envd route cannot be exposed by accident.
- No two top-level packages import each other (layers point one way).
- What a failed stock-SDK call means is decided once (``sdk/errors.py``), not per feature.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pmoves_e2b.envd as envd
from pmoves_e2b.envd.paths import CLIENT_PATHS, HOST_ONLY_PATHS
from pmoves_e2b.sandbox.proxy import is_internal_envd_path

SRC = Path(envd.__file__).resolve().parents[1]
IN_SANDBOX = ("envd", "interpreter")


def _modules() -> Iterator[tuple[Path, ast.Module]]:
    for path in sorted(SRC.rglob("*.py")):
        if "gen" in path.relative_to(SRC).parts:
            continue
        yield path, ast.parse(path.read_text(), str(path))


def _imports(tree: ast.Module) -> Iterator[tuple[str, list[str]]]:
    """(module, names) for every absolute import, anywhere in the file (function bodies too)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []


def _package(path: Path) -> str:
    parts = path.relative_to(SRC).parts
    return parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")


def host_imports_of_envd_internals() -> list[str]:
    found = []
    for path, tree in _modules():
        if _package(path) in IN_SANDBOX:
            continue
        for module, names in _imports(tree):
            if module.startswith("pmoves_e2b.envd."):
                found.append(f"{path.relative_to(SRC)}: imports {module}")
            elif module == "pmoves_e2b.envd":
                found += [f"{path.relative_to(SRC)}: imports envd.{n}" for n in names if n not in envd.__all__]
    return found


def sandbox_imports_of_host_code() -> list[str]:
    found = []
    for path, tree in _modules():
        own = _package(path)
        if own not in IN_SANDBOX:
            continue
        for module, _ in _imports(tree):
            if module.startswith("pmoves_e2b") and not module.startswith(f"pmoves_e2b.{own}"):
                found.append(f"{path.relative_to(SRC)}: imports {module}")
    return found


def envd_router_paths() -> set[str]:
    tree = ast.parse((SRC / "envd" / "app.py").read_text())
    paths = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.match_case):
            for constant in ast.walk(node.pattern):
                if isinstance(constant, ast.Constant) and isinstance(constant.value, str):
                    if constant.value.startswith("/"):
                        paths.add(constant.value)
    return paths


# SDK exceptions whose meaning sdk/errors.classify decides (NotFoundException stays usable for
# "is this sandbox gone?" probes, FileNotFoundException for a path's own 404).
CLASSIFIED_SDK_ERRORS = {
    "AuthenticationException",
    "RateLimitException",
    "TimeoutException",
    "InvalidArgumentException",
    "SandboxNotRunningException",
}


def sdk_errors_mapped_outside_sdk() -> list[str]:
    found = []
    for path, tree in _modules():
        if path.relative_to(SRC).parts[0] == "sdk":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in CLASSIFIED_SDK_ERRORS:
                value = node.value
                if isinstance(value, ast.Name) and value.id != "httpx":
                    found.append(f"{path.relative_to(SRC)}:{node.lineno}: {node.attr}")
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("e2b"):
                found += [
                    f"{path.relative_to(SRC)}:{node.lineno}: imports {a.name}"
                    for a in node.names
                    if a.name in CLASSIFIED_SDK_ERRORS
                ]
    return found


def package_cycles() -> list[str]:
    graph: dict[str, set[str]] = {}
    for path, tree in _modules():
        own = _package(path)
        for module, _ in _imports(tree):
            if module.startswith("pmoves_e2b."):
                target = module.split(".")[1]
                if target != own:
                    graph.setdefault(own, set()).add(target)
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt == trail[0]:
                cycles.append(" -> ".join([*trail, nxt]))
            elif nxt not in trail and nxt > trail[0]:  # each cycle once, from its smallest package
                visit(nxt, [*trail, nxt])

    for start in sorted(graph):
        visit(start, [start])
    return cycles


def test_the_host_imports_only_what_envd_exports() -> None:
    assert host_imports_of_envd_internals() == []


def test_code_inside_sandboxes_imports_no_host_package() -> None:
    assert sandbox_imports_of_host_code() == []


def test_every_envd_route_is_classified_and_host_only_ones_are_refused_by_the_proxy() -> None:
    served = envd_router_paths()
    assert served, "could not read envd's router"
    assert not CLIENT_PATHS & HOST_ONLY_PATHS
    assert served <= CLIENT_PATHS | HOST_ONLY_PATHS, served - (CLIENT_PATHS | HOST_ONLY_PATHS)
    for path in HOST_ONLY_PATHS:
        assert is_internal_envd_path(path) and is_internal_envd_path(path.upper() + "/")
    for path in CLIENT_PATHS:
        assert not is_internal_envd_path(path)


def test_no_two_packages_import_each_other() -> None:
    assert package_cycles() == []


def test_sdk_failures_are_classified_in_one_place() -> None:
    assert sdk_errors_mapped_outside_sdk() == []


def test_the_interpreter_reaches_envd_on_envds_port() -> None:
    from pmoves_e2b.interpreter.app import Settings

    assert Settings().envd_url == f"http://127.0.0.1:{envd.ENVD_PORT}"
