"""Network policy of ns sandboxes: the host reaches in; sandboxes reach neither the host, nor each
other, nor private ranges, and the (fake) internet only with allow_internet."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from pathlib import Path

from isolation.ns_harness import (
    FAKE_INTERNET_HOST_IP,
    FAKE_INTERNET_HOST_VETH,
    FAKE_INTERNET_NETNS,
    FAKE_INTERNET_SERVER_IP,
    Responder,
    Sandboxes,
    listening_socket_in_netns,
)

from pmoves_e2b.sandbox.backends.base import ENVD_PORT, SandboxHandle
from pmoves_e2b.sandbox.backends.ns import network

PROBE = """
import json, socket, sys
results = []
for host, port in json.loads(sys.argv[1]):
    try:
        with socket.create_connection((host, port), timeout=1.5) as sock:
            sock.settimeout(1.5)
            results.append("open:" + sock.recv(100).decode().strip())
    except OSError as exc:
        results.append(type(exc).__name__)
print(json.dumps(results))
"""


def probe(sandboxes: Sandboxes, handle, targets: list[tuple[str, int]]) -> list[str]:
    result = sandboxes.run(handle, "/usr/bin/python3", "-c", PROBE, json.dumps(targets))
    assert result["rc"] == 0, result
    return json.loads(result["stdout"])


def test_sandbox_cannot_reach_host_services(sandboxes: Sandboxes) -> None:
    assert_host_ports_closed(sandboxes, sandboxes.create())


def assert_host_ports_closed(sandboxes: Sandboxes, handle: SandboxHandle) -> None:
    """Host services on loopback and on every address stay unreachable from the sandbox."""
    loopback = Responder(listening_socket_in_netns(None, "127.0.0.1"))
    anywhere = Responder(listening_socket_in_netns(None, "0.0.0.0"))
    try:
        results = probe(
            sandboxes,
            handle,
            [
                ("127.0.0.1", loopback.port),  # the sandbox's own loopback, not the host's
                (handle.details["host_address"], anywhere.port),  # the host end of its veth
                (handle.details["host_address"], loopback.port),
            ],
        )
        assert not any(r.startswith("open") for r in results), results
        assert loopback.peers == [] and anywhere.peers == []
    finally:
        loopback.close()
        anywhere.close()


def test_sandboxes_cannot_reach_each_other_but_the_host_reaches_both(sandboxes: Sandboxes) -> None:
    first = sandboxes.create()
    second = sandboxes.create()
    assert first.address != second.address
    for handle in (first, second):
        with socket.create_connection((handle.address, ENVD_PORT), timeout=5):
            pass
    results = probe(sandboxes, first, [(second.address, ENVD_PORT), (second.details["host_address"], ENVD_PORT)])
    assert not any(r.startswith("open") for r in results), results


def test_host_reaches_any_port_and_root_binds_low_ports(sandboxes: Sandboxes) -> None:
    handle = sandboxes.create()
    server = (
        "import socket; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
        "s.bind(('0.0.0.0', 80)); s.listen(1); print('listening', flush=True); c, _ = s.accept(); "
        "c.sendall(b'from-sandbox'); c.close()"
    )
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(sandboxes.python(handle, server, timeout=20)))
    thread.start()
    try:
        received = b""
        for _ in range(200):  # bounded: the server needs a moment to start
            try:
                with socket.create_connection((handle.address, 80), timeout=2) as sock:
                    received = sock.recv(100)
                break
            except ConnectionRefusedError:
                threading.Event().wait(0.02)
        assert received == b"from-sandbox"
    finally:
        thread.join(timeout=30)
    assert result.get("rc") == 0, result


def test_a_sandbox_has_its_own_tcp_hash_with_the_hosts_tcp_limits(sandboxes: Sandboxes) -> None:
    """Its TCP sockets live in a hash table of its netns (not in the host's chains, and the netns's
    cleaning for reuse walks only it); its TIME_WAIT and half-open limits stay the host's."""
    handle = sandboxes.create()
    keys = ("tcp_ehash_entries", "tcp_max_tw_buckets", "tcp_max_syn_backlog")
    inside = sandboxes.python(handle, f"for key in {keys!r}: print(open('/proc/sys/net/ipv4/' + key).read().strip())")[
        "stdout"
    ].split()
    host = [Path("/proc/sys/net/ipv4", key).read_text().strip() for key in keys]
    assert int(host[0]) > 0  # the host owns its hash (a netns sharing it reads negative)
    assert inside == [str(network.CHILD_TCP_EHASH), host[1], host[2]], (inside, host)


def test_internet_only_when_allowed(sandboxes: Sandboxes, fake_internet: Responder) -> None:
    target = [(FAKE_INTERNET_SERVER_IP, fake_internet.port)]
    offline = sandboxes.create(allow_internet=False)
    online = sandboxes.create(allow_internet=True)

    assert not probe(sandboxes, offline, target)[0].startswith("open")
    # the fake internet sees the host's address (masquerade), never the sandbox's
    assert probe(sandboxes, online, target) == [f"open:hello {FAKE_INTERNET_HOST_IP}"]
    assert fake_internet.peers == [FAKE_INTERNET_HOST_IP]

    # internet access does not open the host or other sandboxes
    results = probe(sandboxes, online, [(offline.address, ENVD_PORT), (online.details["host_address"], ENVD_PORT)])
    assert not any(r.startswith("open") for r in results), results


def test_online_sandboxes_may_use_the_hosts_resolvers_even_in_private_ranges(
    sandboxes: Sandboxes, fake_internet: Responder
) -> None:
    # a stand-in "resolver" at a private address, reached through the fake internet's netns
    resolver = "172.31.255.53"
    netns_path = Path("/run/netns") / FAKE_INTERNET_NETNS
    subprocess.run(["ip", "-n", FAKE_INTERNET_NETNS, "addr", "add", f"{resolver}/32", "dev", "eth0"], check=True)
    subprocess.run(
        ["ip", "route", "add", f"{resolver}/32", "via", FAKE_INTERNET_SERVER_IP, "dev", FAKE_INTERNET_HOST_VETH],
        check=True,
    )
    element = ["inet", network.TABLE, "resolvers4", f"{{ {resolver} }}"]
    dns = Responder(listening_socket_in_netns(netns_path, resolver, 53))
    other = Responder(listening_socket_in_netns(netns_path, resolver))
    subprocess.run(["nft", "add", "element", *element], check=True)
    try:
        online = sandboxes.create(allow_internet=True)
        offline = sandboxes.create(allow_internet=False)
        assert probe(sandboxes, online, [(resolver, 53)])[0].startswith("open")
        assert not probe(sandboxes, online, [(resolver, other.port)])[0].startswith("open")
        assert not probe(sandboxes, offline, [(resolver, 53)])[0].startswith("open")
    finally:
        subprocess.run(["nft", "delete", "element", *element], check=False)
        subprocess.run(["ip", "route", "del", f"{resolver}/32"], check=False)
        dns.close()
        other.close()
