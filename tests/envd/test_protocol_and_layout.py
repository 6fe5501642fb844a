"""Guards: the generated protocol code is current and wire-identical to the SDK's, and envd runs
from the layout templates ship (only ``pmoves_e2b/__init__.py`` + ``pmoves_e2b/envd/``)."""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from envd.conftest import RunningEnvd, free_port, stop_envd, wait_healthy

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "pmoves_e2b"
# Host-side libraries that must never load in envd (templates ship only connectrpc, protobuf-py,
# pyqwest (a connectrpc dependency), uvicorn, httptools and uvloop).
FORBIDDEN_IN_ENVD = ("fastapi", "starlette", "pydantic", "httpx", "e2b", "sqlalchemy", "nats", "yaml")


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None, reason="codegen tools not installed")
def test_generated_code_is_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pmoves_e2b.envd.codegen", "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("ours", "sdk"),
    [
        ("pmoves_e2b.envd.gen.process.process_pb", "e2b.envd.process.process_pb"),
        ("pmoves_e2b.envd.gen.filesystem.filesystem_pb", "e2b.envd.filesystem.filesystem_pb"),
    ],
)
def test_messages_match_the_sdk_wire_format(ours: str, sdk: str) -> None:
    def wire_shape(module_name: str) -> object:
        proto = importlib.import_module(module_name).desc().proto
        proto.options = None  # language options (java_package, ...) do not reach the wire
        return proto

    assert wire_shape(ours) == wire_shape(sdk)


def test_envd_runs_from_the_template_layout(tmp_path: Path, envd_user: str) -> None:
    shipped = tmp_path / "site" / "pmoves_e2b"
    shipped.mkdir(parents=True)
    shutil.copy(PACKAGE / "__init__.py", shipped / "__init__.py")
    shutil.copytree(PACKAGE / "envd", shipped / "envd", ignore=shutil.ignore_patterns("__pycache__", "codegen.py"))
    probe = (
        "import sys; import pmoves_e2b.envd.__main__, pmoves_e2b.envd.app, uvicorn;"
        "print('\\n'.join(sorted(m for m in sys.modules)))"
    )
    env = {"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"}
    modules = subprocess.run(
        [sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.split()
    ours = [m for m in modules if m.startswith("pmoves_e2b.") and not m.startswith("pmoves_e2b.envd")]
    assert ours == []
    assert [m for m in modules if m.split(".")[0] in FORBIDDEN_IN_ENVD] == []
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "pmoves_e2b.envd", "--host", "127.0.0.1", "--port", str(port)],
        env={**env, "ENVD_DEFAULT_USER": envd_user},
        cwd=tmp_path,
        stderr=subprocess.PIPE,
    )
    running = RunningEnvd(process, port, "", envd_user)
    try:
        wait_healthy(running.url, process)
        listed = httpx.post(
            f"{running.url}/process.Process/List",
            content=b"{}",
            headers={"Content-Type": "application/json", "Connect-Protocol-Version": "1"},
        )
        assert listed.status_code == 200
    finally:
        stop_envd(running)
