"""Fixtures: one test network namespace (a stand-in sandbox) and the proxy served by uvicorn."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from proxy.proxy_harness import DOMAIN, SandboxNetns, ServedApp, can_make_netns, make_proxy


@pytest.fixture(scope="session")
def sandbox_netns() -> Iterator[SandboxNetns]:
    reason = can_make_netns()
    if reason:
        pytest.skip(reason)
    netns = SandboxNetns()
    yield netns
    netns.close()


@pytest.fixture(scope="session")
def proxy_port(sandbox_netns: SandboxNetns) -> Iterator[int]:
    served = ServedApp(make_proxy(sandbox_netns.address, DOMAIN))
    yield served.port
    served.close()


@pytest.fixture()
def client(proxy_port: int) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{proxy_port}", timeout=30, trust_env=False) as http:
        yield http
