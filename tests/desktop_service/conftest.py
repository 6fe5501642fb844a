"""Fixtures for the e2b-desktop tests (see desktop_harness.py)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from desktop_service.desktop_harness import DesktopService, run_service


@pytest.fixture(scope="session")
def lone_desktop_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DesktopService]:
    """e2b-desktop on a free port with no reachable sandbox backend (auth, validation, pages)."""
    with run_service(tmp_path_factory.mktemp("desktop")) as service:
        yield service
