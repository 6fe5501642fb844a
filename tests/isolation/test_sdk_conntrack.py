"""Through the stock SDK: one sandbox cannot fill the host's conntrack table (issue 11 item 1).

The table is one per host; when it is full the kernel drops every new connection of the host and
of every sandbox. A sandbox's connections through the host are capped per sandbox
(``network.CONNS_PER_SANDBOX``); beyond it a new one is dropped before it takes an entry.
The flood goes to the `fake_internet` netns only. Run under `flock /tmp/pmoves-netns.lock`.
"""

from __future__ import annotations

import pytest
from e2b import Sandbox
from isolation.ns_harness import FAKE_INTERNET_SERVER_IP, Responder
from isolation.test_sdk_egress_rules import reach

from pmoves_e2b.sandbox.backends.ns import network

pytestmark = pytest.mark.stack

FLOWS = 5000  # distinct UDP flows, each a new conntrack entry (unreplied: 30 s)
FLOOD = (
    'python3 -c "import socket\n'
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "s.connect(('{ip}', 9)); print(s.getsockname()[0]); s.close()\n"
    "for port in range({flows}):\n"
    "    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "    s.sendto(b'x', ('{ip}', 20000 + port)); s.close()\""
)


def entries_from(address: str) -> int:
    """Entries of the host's conntrack table that ``address`` opened (original direction)."""
    with open("/proc/net/nf_conntrack") as table:
        return sum(1 for line in table if f" src={address} " in line.split(" dst=", 1)[0] + " ")


def test_one_sandbox_cannot_fill_the_host_conntrack_table(sdk_env: dict[str, str], fake_internet: Responder) -> None:
    flooder = Sandbox.create(timeout=120)
    neighbour = Sandbox.create(timeout=120)
    try:
        out = flooder.commands.run(FLOOD.format(ip=FAKE_INTERNET_SERVER_IP, flows=FLOWS), timeout=120)
        address = out.stdout.split()[0]
        assert address.startswith("10.77."), out.stdout
        entries = entries_from(address)
        # Without the cap every flow is an entry (5000); with it, at most the cap (+1: its probe).
        assert 0 < entries <= network.CONNS_PER_SANDBOX + 1, entries
        # The flooder is at its cap: a new connection of its own is refused...
        assert not reach(flooder, FAKE_INTERNET_SERVER_IP, fake_internet.port)
        # ...while another sandbox still connects out, and its commands stay quick.
        assert reach(neighbour, FAKE_INTERNET_SERVER_IP, fake_internet.port)
        assert neighbour.commands.run("true", timeout=10).exit_code == 0
    finally:
        flooder.kill()
        neighbour.kill()
