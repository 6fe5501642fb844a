"""Fixtures of the e2b-surf tests.

``internet_netns`` (session scope) -> Path: the "fake internet" netns (FAKE_INTERNET_SERVER_IP,
203.0.113.80, routed from the host). Its names are fixed, so one fixture makes it for the whole
session and every site listens in it (``listening_socket_in_netns(internet_netns, "0.0.0.0")``);
run these tests under ``flock /tmp/pmoves-netns.lock``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from isolation.ns_harness import fake_internet_netns


@pytest.fixture(scope="session")
def internet_netns() -> Iterator[Path]:
    with fake_internet_netns() as netns:
        yield netns
