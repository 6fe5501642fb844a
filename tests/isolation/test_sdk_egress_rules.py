"""Through the stock SDK: `network.allow_out` / `deny_out` and `update_network` are enforced, and no
internet-enabled sandbox reaches the host's own LAN, its gateway or link-local (issue 12 item 1,
issue 11 item 11).

Every address here lives in the `fake_internet` netns (TEST-NET ranges and a link-local address
routed to it); nothing leaves the machine. Run under `flock /tmp/pmoves-netns.lock`.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
from e2b import Sandbox
from isolation.ns_harness import FAKE_INTERNET_HOST_VETH, FAKE_INTERNET_NETNS, FAKE_INTERNET_SERVER_IP, Responder

from pmoves_e2b.sandbox.backends.ns import network

pytestmark = pytest.mark.stack

SECOND_IP = "198.51.100.81"  # same fake-internet netns, another address
FAR_IP = "192.88.99.9"  # routed via the fake internet: "beyond the gateway"
METADATA_IP = "169.254.169.254"
HOST_SIDE_IP = "198.51.100.1"  # the host's own end of the fake-internet link

PROBE = (
    'python3 -c "import socket\n'
    "try:\n"
    "    s = socket.create_connection(('{ip}', {port}), timeout=2); print('open', s.recv(100).decode().strip())\n"
    "except OSError as e:\n"
    "    print('blocked', e)\""
)


@pytest.fixture()
def more_addresses(fake_internet: Responder) -> Iterator[Responder]:
    ns = ["ip", "-n", FAKE_INTERNET_NETNS]
    subprocess.run([*ns, "addr", "add", f"{SECOND_IP}/32", "dev", "eth0"], check=True)
    subprocess.run([*ns, "addr", "add", f"{FAR_IP}/32", "dev", "lo"], check=True)
    subprocess.run([*ns, "addr", "add", f"{METADATA_IP}/32", "dev", "lo"], check=True)
    routes = [f"{FAR_IP}/32", f"{METADATA_IP}/32"]
    for route in routes:
        subprocess.run(["ip", "route", "add", route, "via", FAKE_INTERNET_SERVER_IP], check=True)
    try:
        yield fake_internet
    finally:
        for route in routes:
            subprocess.run(["ip", "route", "del", route], check=False)


def reach(sbx: Sandbox, ip: str, port: int) -> bool:
    out = sbx.commands.run(PROBE.format(ip=ip, port=port), timeout=30).stdout
    assert out.startswith(("open", "blocked")), out
    return out.startswith("open")


def test_allow_and_deny_rules_and_their_updates(sdk_env: dict[str, str], more_addresses: Responder) -> None:
    port = more_addresses.port
    only_one = Sandbox.create(timeout=120, network={"deny_out": ["0.0.0.0/0"], "allow_out": [SECOND_IP]})
    no_far = Sandbox.create(timeout=120, network={"deny_out": ["192.88.99.0/24"]})
    try:
        # deny-all with one exception: allow wins over deny
        assert reach(only_one, SECOND_IP, port)
        assert not reach(only_one, FAKE_INTERNET_SERVER_IP, port)
        assert not reach(only_one, FAR_IP, port)
        # a deny range leaves the rest of the internet alone, and rules are per sandbox
        assert not reach(no_far, FAR_IP, port)
        assert reach(no_far, FAKE_INTERNET_SERVER_IP, port)
        # update_network replaces the rules; omitted fields clear them
        only_one.update_network({"deny_out": [f"{FAKE_INTERNET_SERVER_IP}/32"]})
        assert not reach(only_one, FAKE_INTERNET_SERVER_IP, port)
        assert reach(only_one, FAR_IP, port)
        only_one.update_network({})
        assert reach(only_one, FAKE_INTERNET_SERVER_IP, port)
        assert only_one.get_info().network == {"allow_out": [], "deny_out": [], "allow_public_traffic": True}
        # allow_out cannot open what is never reachable (link-local, the metadata address)
        no_far.update_network({"allow_out": [METADATA_IP]})
        assert not reach(no_far, METADATA_IP, port)
        assert reach(no_far, FAR_IP, port)  # the update cleared the deny rule
    finally:
        only_one.kill()
        no_far.kill()


def test_the_host_lan_and_gateway_are_out_of_reach(sdk_env: dict[str, str], more_addresses: Responder) -> None:
    """Make the fake internet's link look like the host's LAN (a default route through it, at a
    metric that never wins): its subnet and gateway become unreachable, the internet beyond stays."""
    port = more_addresses.port
    sbx = Sandbox.create(timeout=120)
    try:
        assert reach(sbx, FAKE_INTERNET_SERVER_IP, port)
        assert not reach(sbx, METADATA_IP, port)
        route = ["default", "via", FAKE_INTERNET_SERVER_IP, "dev", FAKE_INTERNET_HOST_VETH, "metric", "4242"]
        subprocess.run(["ip", "route", "add", *route], check=True)
        try:
            network.ensure_host_setup()  # what every backend start does
            assert "198.51.100.0/24" in network.host_networks()
            assert not reach(sbx, FAKE_INTERNET_SERVER_IP, port)  # the gateway
            assert not reach(sbx, SECOND_IP, port)  # a neighbour on the LAN
            assert reach(sbx, FAR_IP, port)  # the internet beyond the gateway
        finally:
            subprocess.run(["ip", "route", "del", *route], check=False)
            network.ensure_host_setup()
        assert reach(sbx, FAKE_INTERNET_SERVER_IP, port)
    finally:
        sbx.kill()


HTTP_PROBE = (
    'python3 -c "import socket\n'
    "try:\n"
    "    s = socket.create_connection(('{ip}', 80), timeout=3)\n"
    "    s.sendall(b'GET / HTTP/1.1\\\\r\\\\nHost: {host}\\\\r\\\\n\\\\r\\\\n')\n"
    "    d = s.recv(100).decode().strip()\n"
    "    print('open ' + d if d else 'blocked (closed)')\n"
    "except OSError as e:\n"
    "    print('blocked', e)\""
)
TLS_PROBE = (
    'python3 -c "import socket, ssl\n'
    "s = socket.create_connection(('{ip}', 443), timeout=3)\n"
    "try:\n"
    "    ssl.create_default_context().wrap_socket(s, server_hostname='{host}')\n"
    "except Exception as e:\n"
    '    print(type(e).__name__)"'
)


@pytest.fixture()
def web_ports(fake_internet: Responder) -> Iterator[tuple[Responder, Responder, Responder]]:
    from isolation.ns_harness import listening_socket_in_netns

    path = network.NETNS_DIR / FAKE_INTERNET_NETNS
    http = Responder(listening_socket_in_netns(path, "0.0.0.0", 80))
    tls = Responder(listening_socket_in_netns(path, "0.0.0.0", 443))
    on_host = Responder(listening_socket_in_netns(None, HOST_SIDE_IP, 80))  # the host's own web port
    try:
        yield http, tls, on_host
    finally:
        for responder in (http, tls, on_host):
            responder.close()


def http_get(sbx: Sandbox, host: str) -> str:
    return sbx.commands.run(HTTP_PROBE.format(ip=FAKE_INTERNET_SERVER_IP, host=host), timeout=30).stdout.strip()


def http_get_ip(sbx: Sandbox, ip: str, host: str) -> str:
    return sbx.commands.run(HTTP_PROBE.format(ip=ip, host=host), timeout=30).stdout.strip()


def tls_reaches(sbx: Sandbox, tls: Responder, host: str) -> bool:
    before = len(tls.peers)
    sbx.commands.run(TLS_PROBE.format(ip=FAKE_INTERNET_SERVER_IP, host=host), timeout=30)
    return len(tls.peers) > before


def test_domain_rules_match_http_host_and_tls_sni(
    sdk_env: dict[str, str], fake_internet: Responder, web_ports: tuple[Responder, Responder, Responder]
) -> None:
    _, tls, on_host = web_ports
    sbx = Sandbox.create(timeout=120, network={"allow_out": ["allowed.test", "*.wild.test"], "deny_out": ["0.0.0.0/0"]})
    try:
        assert http_get(sbx, "allowed.test").startswith("open hello")
        assert http_get(sbx, "a.wild.test").startswith("open hello")
        assert http_get(sbx, "other.test").startswith("blocked")
        assert tls_reaches(sbx, tls, "allowed.test")
        assert not tls_reaches(sbx, tls, "other.test")
        assert not reach(sbx, FAKE_INTERNET_SERVER_IP, fake_internet.port)  # other ports: deny-all by nft
        # the proxy connects from the host, yet never to the host itself
        sbx.update_network({"allow_out": ["allowed.test"]})
        assert http_get(sbx, "allowed.test").startswith("open hello")
        assert http_get_ip(sbx, HOST_SIDE_IP, "allowed.test").startswith("blocked")
        assert on_host.peers == []
        # a denied name, everything else open; then no rules at all (no more interception)
        sbx.update_network({"deny_out": ["blocked.test"]})
        assert http_get(sbx, "other.test").startswith("open hello")
        assert http_get(sbx, "blocked.test").startswith("blocked")
        sbx.update_network({})
        assert http_get(sbx, "blocked.test").startswith("open hello")
    finally:
        sbx.kill()


def test_dns_servers_are_reachable_when_a_domain_is_allowed(sdk_env: dict[str, str], more_addresses: Responder) -> None:
    port = more_addresses.port
    sbx = Sandbox.create(
        timeout=120, network={"allow_out": ["allowed.test"], "deny_out": ["0.0.0.0/0"], "dns_servers": [SECOND_IP]}
    )
    try:
        assert reach(sbx, SECOND_IP, port)  # all traffic to a listed DNS server, as E2B allows
        assert not reach(sbx, FAKE_INTERNET_SERVER_IP, port)
        assert sbx.get_info().network["dns_servers"] == [SECOND_IP]  # type: ignore[index]
        sbx.update_network({"deny_out": ["0.0.0.0/0"], "dns_servers": [SECOND_IP]})  # no domain: no effect
        assert not reach(sbx, SECOND_IP, port)
    finally:
        sbx.kill()
