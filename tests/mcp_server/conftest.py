"""Fixtures for the e2b-mcp-server tests (see mcp_harness.py)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from mcp_server.mcp_harness import McpService, mcp122_python, run_service


@pytest.fixture(scope="session")
def mcp_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[McpService]:
    """e2b-mcp-server on a free port with no reachable sandbox backend (auth, validation, transports)."""
    with run_service(tmp_path_factory.mktemp("mcp")) as service:
        yield service


@pytest.fixture(scope="session")
def mcp122() -> Path:
    return mcp122_python()
