"""TCP endpoints a sandbox's netstack may still hold for connections with the host, found by asking it.

No view shows them all: gVisor's /proc/net/tcp lists only the sockets processes hold, and the host's
conntrack shows its last guess of the connection's state, for a while. The loss of issue 18: envd
closed a ``Connection: close`` answer first, the host closed its end, and its socket was destroyed
by the quiesce's ``ss -K`` while it waited in LAST_ACK for the sandbox's final ACK, which a loaded
sentry sent late. That ACK found no socket, the host kernel answered it with a reset, and conntrack
turned the entry to CLOSE (then forgot it after 10 s), while netstack's end sat in TIME_WAIT
(which ignores resets, RFC 1337) for 60 s: ``runsc checkpoint`` refused it and ended the sandbox.

So every 4-tuple the host and the sandbox used recently (``SEEN_SET``, kept by this module's
table on each SYN, FIN or reset between them once their handshake completed: conntrack's entries
end too early) is probed from the
host's end of the veth (a packet socket: no socket, rule or conntrack of the host is involved) with
one byte of data at a random sequence number, which gVisor's netstack answers as follows:
- a reset (its sequence number from our ACK field): it holds no synchronized endpoint for it;
- an ACK (a challenge: out of window, and data is always acknowledged, without rate limit): it
  holds one, in any state from ESTABLISHED to TIME_WAIT. A reset whose sequence number is that
  ACK's acknowledgement (the endpoint's RCV.NXT) then ends it, except in TIME_WAIT, which only a
  new SYN from the same host port ends (RFC 1122: it becomes a handshake, which a reset ends;
  with no listener left it drops the SYN, and is asked until it ends by itself, 60 s at most).
The probe is sent again until the sandbox answers with a reset. A handshake it may hold (SYN-RCVD)
answers a reset too, so those stay with conntrack (``quiesce.open_connections``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

from pmoves_e2b.sandbox.backends.ns import network
from pmoves_e2b.sandbox.backends.ns.network import SandboxNet

SEEN_SET = "seen4"
# How long a 4-tuple is remembered after its last SYN, FIN or reset: longer than an endpoint can
# linger without sending or receiving anything (TIME_WAIT, and an orphaned FIN_WAIT_2: 60 s each),
# with room for a loaded sentry's late timers.
SEEN_TIMEOUT_S = 90
SEEN_MAX = 65536
# How long a round waits for answers (it ends when each pair was answered) before it probes again
PROBE_EVERY_S = 0.3
ETH_P_IP = 0x0800
SO_RCVBUFFORCE = 33
RECEIVE_BUFFER = 16 << 20
PACKET_OUTGOING = 4
SYN, RST, PSH, ACK = 0x02, 0x04, 0x08, 0x10  # TCP flags

Pair = tuple[int, int]  # (the sandbox's port, the host's port)


SEEN_TABLE = "pmoves_e2b_linger"
SEEN_RULES_VERSION = "v1"
_VETHS = f'"{network.HOST_VETH_PREFIX}*"'
# a SYN, FIN or reset of a connection whose handshake completed (conntrack's "assured"): the
# refused ones, e.g. the service's readiness probes before envd listens, leave no endpoint behind
_CONTROL = "ct status assured tcp flags & (syn | fin | rst) != 0"
# A table of its own (not the gate's): a service of another version that replaces the gate's table
# (``network.ensure_table``) takes the elements of checkpoints in progress with it.
SEEN_RULESET = f"""
table inet {SEEN_TABLE} {{
  chain {SEEN_RULES_VERSION} {{ }}
  set {SEEN_SET} {{
    type ipv4_addr . inet_service . ipv4_addr . inet_service; flags dynamic, timeout;
    timeout {SEEN_TIMEOUT_S}s; size {SEEN_MAX};
  }}
  chain output {{
    type filter hook output priority -20; policy accept;
    oifname {_VETHS} {_CONTROL} update @{SEEN_SET} {{ ip daddr . tcp dport . ip saddr . tcp sport }}
  }}
  chain input {{
    type filter hook input priority -20; policy accept;
    iifname {_VETHS} {_CONTROL} update @{SEEN_SET} {{ ip saddr . tcp sport . ip daddr . tcp dport }}
  }}
}}
"""


def ensure_table() -> None:
    network.ensure_table("inet", SEEN_TABLE, SEEN_RULES_VERSION, SEEN_RULESET)


def seen_pairs(net: SandboxNet, since: float) -> set[Pair]:
    """The (sandbox port, host port) pairs linger's set remembers for ``net`` whose last SYN, FIN
    or reset was after ``since`` (time.time(): the start of the sandbox's netstack, its create or
    last restore; a restored netstack holds nothing from before, and an older one was another
    sandbox's on the same address)."""
    listing = network.nft(f"list set inet {SEEN_TABLE} {SEEN_SET}")
    pattern = re.compile(
        rf"{re.escape(net.address)} \. (\d+) \. {re.escape(net.host_address)} \. (\d+) expires ([0-9dhms]+)"
    )
    now = time.time()
    return {
        (int(sport), int(hport))
        for sport, hport, expires in pattern.findall(listing)
        if now - (SEEN_TIMEOUT_S - _seconds(expires)) >= since
    }


def _seconds(duration: str) -> float:
    """nft's duration ("1m29s996ms") in seconds."""
    units = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * units[unit] for n, unit in re.findall(r"(\d+)(ms|d|h|m|s)", duration))


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


class _Veth:
    """A packet socket on the host's end of a sandbox's veth: frames to the sandbox's netstack from
    its host address, and the sandbox's TCP answers to it."""

    def __init__(self, net: SandboxNet) -> None:
        self.net = net
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IP))
        # room for every answer of a round (thousands of pairs after a busy minute): one this socket
        # drops is a SYN-ACK missed, or a round more
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
        self.sock.bind((net.host_veth, ETH_P_IP))
        host_mac = Path(f"/sys/class/net/{net.host_veth}/address").read_text().strip()
        # gVisor's netstack takes the sandbox end's MAC, fixed on this tier (network.FIXED_MACS)
        self.link = _mac(network.FIXED_MACS[1]) + _mac(host_mac) + struct.pack("!H", ETH_P_IP)
        self.host = ipaddress.IPv4Address(net.host_address).packed
        self.sandbox = ipaddress.IPv4Address(net.address).packed

    def close(self) -> None:
        self.sock.close()

    def send(self, pair: Pair, flags: int, seq: int, ack: int, payload: bytes = b"") -> None:
        sport, hport = pair
        window = 0 if flags & RST else 65535
        tcp = struct.pack("!HHIIBBHHH", hport, sport, seq, ack, 5 << 4, flags, window, 0, 0) + payload
        pseudo = self.host + self.sandbox + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
        tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
        ip = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, socket.IPPROTO_TCP, 0, self.host, self.sandbox
        )
        ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
        self.sock.send(self.link + ip + tcp)

    def receive(self, until: float) -> tuple[Pair, int, int] | None:
        """The next TCP segment from the sandbox to its host address before ``until`` (monotonic):
        (pair, flags, its ACK field); None when the time is up."""
        while (left := until - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                frame, where = self.sock.recvfrom(2048)
            except TimeoutError:
                return None
            if where[2] == PACKET_OUTGOING or len(frame) < 14 + 20 + 20:
                continue
            ip = frame[14:]
            header = (ip[0] & 0x0F) * 4
            if ip[9] != socket.IPPROTO_TCP or ip[12:16] != self.sandbox or ip[16:20] != self.host:
                continue
            sport, hport, _, ack, _, flags = struct.unpack("!HHIIBB", ip[header : header + 14])
            return (sport, hport), flags, ack
        return None


@contextlib.contextmanager
def _veth(net: SandboxNet) -> Iterator[_Veth]:
    veth = _Veth(net)
    try:
        yield veth
    finally:
        veth.close()


def sweep(net: SandboxNet, pairs: set[Pair], wait_s: float) -> list[str]:
    """Probe each pair until the sandbox answers it with a reset (it holds no endpoint for it).
    Any answer with an ACK is an endpoint, which a reset at that ACK's acknowledgement ends
    (RCV.NXT of a synchronized one, the handshake's of a SYN-ACK), but TIME_WAIT, which ignores
    resets (RFC 1337): one still answering after a reset sent in an earlier round gets a SYN above
    its RCV.NXT, which it hands to the port's listener as a new connection (RFC 1122), whose
    SYN-ACK the same rule resets. Returns what is still held or unanswered after ``wait_s``."""
    pending = set(pairs)
    reset_in: dict[Pair, int] = {}  # pair -> the round its first reset was sent in
    deadline = time.monotonic() + wait_s
    round_ = 0
    with _veth(net) as veth:
        while pending and time.monotonic() < deadline:
            round_ += 1
            for pair in pending:
                veth.send(pair, ACK | PSH, _random32(), _random32(), b"\0")
            until = time.monotonic() + PROBE_EVERY_S
            answered: set[Pair] = set()
            answered_ack: set[Pair] = set()
            while not pending <= answered and (answer := veth.receive(until)) is not None:
                pair, flags, ack = answer
                if pair not in pairs:
                    continue
                answered.add(pair)
                if flags & RST:
                    if pair not in answered_ack:  # else it held an endpoint this round: asked again
                        pending.discard(pair)
                elif flags & ACK:
                    # also for a pair a reset answered before: the SYN-ACK of the handshake a
                    # TIME_WAIT handed on can come after that reset (the probe can reach the
                    # listener before the handshake is made)
                    pending.add(pair)
                    answered_ack.add(pair)
                    veth.send(pair, RST, ack, 0)
                    first = reset_in.setdefault(pair, round_)
                    # an answer to a probe sent after the first reset (not a late one to a probe
                    # before it): TIME_WAIT
                    if round_ > first + 1 and not flags & SYN:
                        veth.send(pair, SYN, (ack + 1) % 2**32, 0)
    return [
        f"{net.host_address}:{hport} -> {net.address}:{sport} {'held' if (sport, hport) in reset_in else 'no answer'}"
        for sport, hport in sorted(pending)
    ]


def _random32() -> int:
    return int.from_bytes(os.urandom(4), "big")
