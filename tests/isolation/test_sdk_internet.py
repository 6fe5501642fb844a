"""Through the stock SDK: `allow_internet_access=False` cuts a sandbox off from the (fake) internet.

The fake internet is a netns at TEST-NET-2 (198.51.100.80) made by the `fake_internet` fixture;
nothing leaves the machine.
"""

from __future__ import annotations

import pytest
from e2b import Sandbox
from isolation.ns_harness import FAKE_INTERNET_SERVER_IP, Responder

pytestmark = pytest.mark.stack

PROBE = (
    "python3 -c \"import socket; s = socket.create_connection(('{ip}', {port}), timeout=3); "
    'print(s.recv(100).decode().strip())"'
)


def test_sdk_sandboxes_reach_the_internet_only_when_allowed(sdk_env: dict[str, str], fake_internet: Responder) -> None:
    online = Sandbox.create(timeout=60)
    offline = Sandbox.create(timeout=60, allow_internet_access=False)
    try:
        probe = PROBE.format(ip=FAKE_INTERNET_SERVER_IP, port=fake_internet.port)
        assert online.commands.run(probe).stdout.startswith("hello ")
        refused = offline.commands.run(probe + " || echo blocked")
        assert refused.stdout.strip().endswith("blocked")
        assert offline.get_info().allow_internet_access is False
        assert len(fake_internet.peers) == 1
    finally:
        online.kill()
        offline.kill()
