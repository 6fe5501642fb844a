"""A destroyed ns sandbox's netns is cleaned and kept for the next sandbox (``network.recycle``):
the next sandbox on that slot must find nothing of the previous one, root inside can never change
the netns itself, a netns the host put rules in is not kept, and a restarted service removes the
kept netns a crashed one left."""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
from pathlib import Path

from isolation.ns_harness import FAKE_INTERNET_SERVER_IP, Responder, Sandboxes

from pmoves_e2b.sandbox.backends.ns import NsBackend, netlink, network
from pmoves_e2b.sandbox.backends.ns.slots import SlotRegistry

# a daemon that listens on 8080 and answers every connection, its output detached from the agent's
LISTENER = """
import os, socket, sys
server = socket.socket()
server.bind(("0.0.0.0", 8080))
server.listen(8)
if os.fork():
    sys.exit(0)
os.setsid()
null = os.open("/dev/null", os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
while True:
    conn, _ = server.accept()
    conn.sendall(b"previous owner\\n")
    conn.close()
"""
# binds 8080 without SO_REUSEADDR: fails while any socket of the port lingers (TIME_WAIT)
BIND_8080 = "import socket; s = socket.socket(); s.bind(('0.0.0.0', 8080)); print('bound')"
SHELL_PATH = "PATH=/usr/sbin:/usr/bin:/sbin:/bin; "


def shell(sandboxes: Sandboxes, handle, command: str) -> dict:
    return sandboxes.run(handle, "/bin/sh", "-c", SHELL_PATH + command)


def egress_rules(slot: int) -> str:
    return network.nft(f"list chain inet {network.EGRESS_TABLE} egress_{slot}")


def conntrack_from(address: str) -> int:
    """Host connection tracking entries the address started (counted by deleting none)."""
    with netlink._Socket(netlink.NETLINK_NETFILTER) as nfnl:
        dump = nfnl.request(
            (netlink.NFNL_SUBSYS_CTNETLINK << 8) | netlink.IPCTNL_MSG_CT_GET,
            netlink.NLM_F_DUMP,
            netlink._nfgen(socket.AF_INET),
        )
    packed = socket.inet_aton(address)
    return sum(1 for _, body in dump if netlink._orig_ip(body[4:], netlink.CTA_IP_V4_SRC) == packed)


def test_the_next_sandbox_on_a_kept_netns_finds_nothing_of_the_previous(
    sandboxes: Sandboxes, fake_internet: Responder
) -> None:
    backend = sandboxes.backend
    first = sandboxes.create(allow_internet=True)
    slot = first.details["slot"]
    asyncio.run(backend.set_egress(first, ("198.51.100.0/24",), ("203.0.113.0/24",)))
    assert "198.51.100.0/24" in egress_rules(slot)
    # what the first one leaves: a listener, connections in every closing state, a connection
    # through the host to the (fake) internet with its tracking and TCP metrics
    assert sandboxes.python(first, LISTENER)["rc"] == 0
    for _ in range(3):
        with socket.create_connection((first.address, 8080), timeout=5) as conn:
            assert conn.recv(100) == b"previous owner\n"
    target = (FAKE_INTERNET_SERVER_IP, fake_internet.port)
    probe = f"import socket; s = socket.create_connection({target!r}, 3); print(s.recv(100).decode())"
    assert "hello" in sandboxes.python(first, probe)["stdout"]
    assert conntrack_from(first.address) >= 1
    assert FAKE_INTERNET_SERVER_IP in shell(sandboxes, first, "ip tcp_metrics show")["stdout"]
    # it cannot change the netns's sysctls (it has no CAP_NET_ADMIN over it)
    assert shell(sandboxes, first, "echo 1024 > /proc/sys/net/ipv4/ip_unprivileged_port_start")["rc"] != 0

    sandboxes.destroy(first)
    assert slot in backend.free_slots()
    second = sandboxes.create(allow_internet=False)
    assert second.details["slot"] == slot and second.details["net_reused"], second.details
    assert second.address == first.address

    assert second.address not in network.internet_addresses()
    assert "ip daddr" not in egress_rules(slot)  # its own empty chain, not the first one's rules
    assert conntrack_from(second.address) == 0
    assert "hello" not in sandboxes.python(second, probe)["stdout"]  # no internet
    try:
        socket.create_connection((second.address, 8080), timeout=3).close()
        raise AssertionError("the previous sandbox's listener still answers")
    except ConnectionRefusedError:
        pass
    assert sandboxes.python(second, BIND_8080)["stdout"].strip() == "bound"
    sockets = shell(sandboxes, second, "ss -Htan")["stdout"].splitlines()
    assert all(":49983" in line for line in sockets), sockets  # only the agent's own
    assert FAKE_INTERNET_SERVER_IP not in shell(sandboxes, second, "ip tcp_metrics show")["stdout"]
    assert shell(sandboxes, second, "cat /proc/sys/net/ipv4/ip_unprivileged_port_start")["stdout"].strip() == "0"
    addresses = shell(sandboxes, second, "ip -4 -o addr show dev eth0")["stdout"]
    assert f"{second.address}/30" in addresses
    assert f"default via {second.details['host_address']}" in shell(sandboxes, second, "ip route")["stdout"]


def test_root_inside_cannot_change_its_netns(sandboxes: Sandboxes) -> None:
    handle = sandboxes.create()
    for command in (
        "ip addr add 10.9.9.9/32 dev eth0",
        "ip link set eth0 mtu 1400",
        "ip link set eth0 address 02:00:00:00:00:01",
        "ip route add 10.9.0.0/16 dev eth0",
        "ip link add dummy0 type dummy",
        "ip tcp_metrics flush all",
        "echo 1 > /proc/sys/net/ipv4/ip_forward",
        "nft add table ip mine",
    ):
        result = shell(sandboxes, handle, command)
        assert result["rc"] != 0, (command, result)


def test_a_netns_with_host_rules_in_it_is_not_kept(sandboxes: Sandboxes) -> None:
    backend = sandboxes.backend
    handle = sandboxes.create()
    listener = asyncio.run(backend.open_intercept(handle))
    listener.close()
    sandboxes.destroy(handle)
    assert handle.details["slot"] not in backend.free_slots()
    assert handle.details["netns"] not in network.list_netns()


def test_a_restarted_service_removes_the_kept_netns_of_a_crashed_one(sandboxes: Sandboxes) -> None:
    runtime_dir = Path(tempfile.mkdtemp(prefix="pmoves-e2b-crash-")) / "sandboxes"
    crashed = NsBackend(runtime_dir, zygote=False)
    handle = asyncio.run(crashed.create(sandboxes.spec()))
    slot = handle.details["slot"]
    asyncio.run(crashed.destroy(handle))
    assert crashed.free_slots() == {slot}
    assert network.free_netns(slot) in network.list_netns()
    assert SlotRegistry().owners()[slot].get("free")
    # the crashed process is gone without a word; the next one on its data dir starts clean
    restarted = NsBackend(runtime_dir)
    try:
        removed = asyncio.run(restarted.cleanup_orphans(set()))
        assert network.free_netns(slot) in removed
        assert network.free_netns(slot) not in network.list_netns()
        assert not Path(f"/sys/class/net/e2bh{slot}").exists()
        assert slot not in SlotRegistry().owners()
    finally:
        restarted.close()  # the crashed one's host setup too: same runtime dir
        shutil.rmtree(runtime_dir.parent, ignore_errors=True)


def test_closing_the_backend_removes_every_kept_netns(sandboxes: Sandboxes) -> None:
    runtime_dir = Path(tempfile.mkdtemp(prefix="pmoves-e2b-close-")) / "sandboxes"
    own = NsBackend(runtime_dir, zygote=False)
    handles = [asyncio.run(own.create(sandboxes.spec())) for _ in range(2)]
    for handle in handles:
        asyncio.run(own.destroy(handle))
    kept = own.free_slots()
    assert len(kept) == 2
    own.close()
    shutil.rmtree(runtime_dir.parent, ignore_errors=True)
    assert not any(network.free_netns(s) in network.list_netns() for s in kept)
    assert not any(s in SlotRegistry().owners() for s in kept)
