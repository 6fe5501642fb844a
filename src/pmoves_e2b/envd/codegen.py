"""Regenerate (or check) the envd protocol code in ``envd/gen`` from ``proto/``.

Dev tool only, never imported by envd at run time. It runs protoc from ``grpcio-tools`` with the
``protoc-gen-py`` (protobuf-py messages) and ``protoc-gen-connectrpc`` (Connect stubs) plugins; their
versions are pinned in the ``test`` extra so the output is reproducible.

    python -m pmoves_e2b.envd.codegen           # rewrite src/pmoves_e2b/envd/gen
    python -m pmoves_e2b.envd.codegen --check   # exit 1 if gen/ is stale
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
GEN_DIR = PACKAGE_DIR / "gen"
PROTO_DIR = PACKAGE_DIR.parents[2] / "proto"
PROTO_FILES = ("process/process.proto", "filesystem/filesystem.proto")
PLUGINS = {"py": "protoc-gen-py", "connectrpc": "protoc-gen-connectrpc"}
GEN_INIT = '"""Generated from proto/ by `make proto`. Do not edit."""\n'


class CodegenError(RuntimeError):
    """The tool chain is missing or protoc failed."""


def _plugin_path(executable: str) -> str:
    # Prefer the plugin installed next to this interpreter (the venv), then PATH.
    beside = Path(sys.executable).parent / executable
    found = str(beside) if beside.exists() else shutil.which(executable)
    if not found:
        raise CodegenError(f"{executable} not found: pip install '.[test]'")
    return found


def generate(out_dir: Path) -> None:
    """Write the generated modules for every proto file under ``out_dir``."""
    try:
        import grpc_tools
    except ImportError as exc:
        raise CodegenError("grpcio-tools not installed: pip install '.[test]'") from exc
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{well_known}"]
    for name, executable in PLUGINS.items():
        args += [f"--plugin=protoc-gen-{name}={_plugin_path(executable)}", f"--{name}_out={out_dir}"]
    result = subprocess.run([*args, *PROTO_FILES], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise CodegenError(f"protoc failed:\n{result.stderr}")
    for package in {Path(p).parent for p in PROTO_FILES}:
        (out_dir / package / "__init__.py").write_text("")
    (out_dir / "__init__.py").write_text(GEN_INIT)


def _make_readable(root: Path) -> None:
    root.chmod(0o755)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _differences(expected: Path, actual: Path) -> list[str]:
    expected_files = {p.relative_to(expected) for p in expected.rglob("*.py")}
    actual_files = {p.relative_to(actual) for p in actual.rglob("*.py")} if actual.exists() else set()
    stale = [str(p) for p in sorted(expected_files - actual_files)] + [
        str(p) for p in sorted(actual_files - expected_files)
    ]
    for rel in sorted(expected_files & actual_files):
        if not filecmp.cmp(expected / rel, actual / rel, shallow=False):
            stale.append(str(rel))
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if gen/ differs from proto/")
    options = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        try:
            generate(fresh)
        except CodegenError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if options.check:
            stale = _differences(fresh, GEN_DIR)
            if stale:
                print("envd/gen is out of date (run `make proto`): " + ", ".join(stale), file=sys.stderr)
                return 1
            print("envd/gen is up to date")
            return 0
        shutil.rmtree(GEN_DIR, ignore_errors=True)
        # copy contents only: the temp dir's 0700 mode must not reach the package
        shutil.copytree(fresh, GEN_DIR, copy_function=shutil.copyfile)
        _make_readable(GEN_DIR)
    print(f"generated {GEN_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
