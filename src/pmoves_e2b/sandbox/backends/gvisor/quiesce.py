"""A sandbox with no TCP connection on its veth, held that way while runsc saves it.

This runsc (0.0~20221219) cannot save a TCP endpoint on the veth that is connected or in
TIME_WAIT, and a refused save ends the sandbox. So before a checkpoint:

1. ``gate``: the sandbox's address joins ``gated4`` in the host's table ``inet pmoves_e2b_gate``,
   whose rules answer every new TCP connection to it (host OUTPUT and FORWARD) or from it (INPUT,
   FORWARD) with a reset. It has to be on the host's side: gVisor's netstack reads its frames from
   the veth with a packet socket, before the sandbox netns's own netfilter would see them. Only
   SYNs are refused, so the resets and FINs that end the existing connections still pass; a
   socket marked ``GATE_PASS_MARK`` passes too (``end_time_wait`` reopens from the host's side).
   Elements expire after ``GATE_TIMEOUT_S``, so a service that dies meanwhile gates no one for long.
2. ``quiet``: the host's sockets to the sandbox are reset (``ss -K``), TIME_WAITs the sandbox may
   hold for host connections are ended (RFC 1122 reopen from the same host port; also where the
   host's end waits in TIME_WAIT too: a simultaneous close), and the sandbox's other
   connections (the host's conntrack) are waited for; every 4-tuple it used with the host is
   then asked of its netstack (``linger.py``), which ends what it still holds; then the
   sandbox's own view (its /proc/net/tcp, through ``runsc exec``) must show no connected socket
   on the veth either.
3. ``ungate`` once runsc checkpoint has returned, saved or not.

Before 1, while the sandbox could still be reached, an in-flight connection could arrive after the
reset and before the save: that lost 3 sandboxes in ~15 checkpoints of E2B's own SDK tests.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ipaddress
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from pmoves_e2b.sandbox.backends.gvisor import linger
from pmoves_e2b.sandbox.backends.ns import network
from pmoves_e2b.sandbox.backends.ns.network import SandboxNet

GATE_TABLE = "pmoves_e2b_gate"
GATE_RULES_VERSION = "v1"
GATE_TIMEOUT_S = 600  # longer than any checkpoint: the quiet wait (65 s) + runsc checkpoint (120 s)
GATE_PASS_MARK = 0x0E2B0001
# How long a quiet sandbox must stay quiet before it is saved: its netstack (a loaded, ptrace'd
# sentry) processes the last packets it was sent within that (see ``quiet``).
SETTLE_S = 0.5
# When in the settle the sandbox's own view is read (``connected_inside``, a ``runsc exec`` of ~50 ms
# idle): late, so the resets just sent have reached the sockets its processes hold, and within the
# settle rather than after it, which it only made longer.
INSIDE_AT_S = 0.35
_SYN = "tcp flags & (syn | ack) == syn"
GATE_RULESET = f"""
table inet {GATE_TABLE} {{
  chain {GATE_RULES_VERSION} {{ }}
  set gated4 {{ type ipv4_addr; flags timeout; }}
  chain output {{
    type filter hook output priority -20; policy accept;
    ip daddr @gated4 meta mark != {GATE_PASS_MARK:#x} {_SYN} reject with tcp reset
  }}
  chain input {{
    type filter hook input priority -20; policy accept;
    ip saddr @gated4 {_SYN} reject with tcp reset
  }}
  chain forward {{
    type filter hook forward priority -20; policy accept;
    ip daddr @gated4 {_SYN} reject with tcp reset
    ip saddr @gated4 {_SYN} reject with tcp reset
  }}
}}
"""

CONNTRACK = Path("/proc/net/nf_conntrack")
# A TCP endpoint that closed first waits this long in TIME_WAIT (gVisor's netstack, as Linux).
PEER_TIME_WAIT_S = 60.0
# A host SYN whose entry saw no packet for this long was never taken by the sandbox (see
# ``open_connections``): netstack retransmits an unanswered SYN-ACK after 1 s.
UNANSWERED_SYN_S = 3.0
CONNTRACK_CLOCK_S = 2.0  # how much older than it is an entry's last packet may look (see ``quiet``)
# conntrack's TCP timeouts (/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_<name>) by the state an
# entry shows; SYN_SENT2 has no sysctl of its own and the same 120 s as SYN_SENT.
_TIMEOUT_OF = {
    "SYN_SENT": "syn_sent",
    "SYN_SENT2": "syn_sent",
    "SYN_RECV": "syn_recv",
    "ESTABLISHED": "established",
    "FIN_WAIT": "fin_wait",
    "CLOSE_WAIT": "close_wait",
    "LAST_ACK": "last_ack",
    "TIME_WAIT": "time_wait",
    "CLOSE": "close",
}
_OPEN_STATES = {"SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT", "LAST_ACK", "SYN_SENT2"}
# A handshake the sandbox may hold (SYN-RCVD) answers linger's probe with a reset, as no endpoint does
_HANDSHAKE_STATES = {"SYN_SENT", "SYN_RECV", "SYN_SENT2"}
# How long a sweep may take when the quiet's deadline is near or past (it probes what it knows once)
SWEEP_MIN_S = 1.0
_TUPLE = {"src", "dst", "sport", "dport"}

# Run inside the sandbox: its TCP sockets that are neither listening nor on loopback ("st local
# remote", hex as in /proc/net/tcp). gVisor lists the sockets that processes hold.
CONNECTED_SCAN = r"""
awk 'FNR > 1 && $4 != "0A" {
  split($2, l, ":"); split($3, r, ":")
  if (substr(l[1], 7, 2) != "7F" && substr(r[1], 7, 2) != "7F") print $4, $2, $3
}' /proc/net/tcp 2>/dev/null
"""


def ensure_table() -> None:
    """The gate's table and linger's, once per host (replaced when their version changed)."""
    network.ensure_table("inet", GATE_TABLE, GATE_RULES_VERSION, GATE_RULESET)
    linger.ensure_table()


def gate(net: SandboxNet) -> None:
    network.nft(f"add element inet {GATE_TABLE} gated4 {{ {net.address} timeout {GATE_TIMEOUT_S}s }}\n")


def ungate(net: SandboxNet) -> None:
    element = f"inet {GATE_TABLE} gated4 {{ {net.address} }}"
    network.nft(f"add element {element}\ndelete element {element}\n")  # nft 1.0 has no "delete if present"


@contextlib.contextmanager
def gated(net: SandboxNet) -> Iterator[None]:
    gate(net)
    try:
        yield
    finally:
        ungate(net)


def quiet(net: SandboxNet, since: float, connected_inside: Callable[[], list[str]], wait_s: float) -> list[str]:
    """Under ``gate``: end the host's connections to the sandbox and wait up to ``wait_s`` until it
    holds none on its veth (conntrack, then its netstack's answers for each 4-tuple it used with
    the host, ``sweep_host_pairs``, then ``connected_inside()``, the sandbox's own view), and
    then ``SETTLE_S`` more in which no packet of the sandbox moved a conntrack entry: the last
    packets sent (resets, the final ACK of a close) are then processed by its netstack too, which
    a save that came first would find mid-close (a socket no process holds any more, ending its
    close, is in no view of the sandbox's own). The sandbox's own view is read within the settle
    (``INSIDE_AT_S``): once the gate is up, a socket its processes hold can only close, never
    connect, so a view that is quiet then stays quiet. Returns what is still open at the deadline
    ([] when quiet). ``since`` (time.time()) is when the sandbox's netstack started (its create or
    last restore): conntrack entries that saw no packet since were not its connections (a
    restored netstack holds none on the veth), but another sandbox's at the same address."""
    deadline = time.monotonic() + wait_s
    # conntrack shows whole seconds left (rounded down), so an entry's last packet looks up to a
    # second older than it is: one from just after ``since`` must not pass for one from before
    since -= CONNTRACK_CLOCK_S
    reopened: set[tuple[str, int, str, int]] = set()
    while True:
        reset_host_connections(net.address)
        end_time_wait(net.address, net.host_address, since, reopened)
        busy = open_connections(net.address, net.host_address, since)
        if not busy:
            busy = sweep_host_pairs(net, since, deadline)
        if not busy:
            before = _entries(net.address, net.host_address)
            settled = time.monotonic() + SETTLE_S
            time.sleep(INSIDE_AT_S)
            busy = [f"inside: {line}" for line in connected_inside()]
            if not busy:
                time.sleep(max(0.0, settled - time.monotonic()))
                busy = _moved(before, _entries(net.address, net.host_address))
            if not busy:
                return []
        if time.monotonic() >= deadline:
            return busy
        time.sleep(0.25)


def sweep_host_pairs(net: SandboxNet, since: float, deadline: float) -> list[str]:
    """``linger.sweep`` of every 4-tuple between the host and the sandbox that linger's set or
    conntrack knows (under the gate, after ``reset_host_connections``: the host holds none of
    them any more, but TIME_WAITs)."""
    timeouts = _timeouts()
    now = time.time()
    pairs = {
        (int(t["dport"]), int(t["sport"])) if t["dst"] == net.address else (int(t["sport"]), int(t["dport"]))
        for state, remaining, t in _conntrack_tcp(net.address)
        if net.host_address in (t["src"], t["dst"])
        and now - _idle_s(state, remaining, timeouts) >= since
        and t["assured"]  # a handshake completed (a refused SYN leaves no endpoint)
    }
    try:
        pairs |= linger.seen_pairs(net, since)
    except network.NetworkError:
        # its table is missing only when something deleted it (the service makes it at its start,
        # and nothing of ours removes it): conntrack's pairs are still swept
        pass
    if not pairs:
        return []
    if any(pair[0] == net.host_address and pair[2] == net.address for pair in _host_time_wait()):
        # they would answer the sandbox's answers to the probes (a reset from it ends them anyway)
        _destroy_host_time_wait(net.address)
    return linger.sweep(net, pairs, max(SWEEP_MIN_S, deadline - time.monotonic()))


def _entries(address: str, host_address: str) -> dict[tuple[str, ...], tuple[str, float]]:
    """conntrack's entries of ``address`` the settle watches: not those with the host past their
    handshake, which the sweep asked the sandbox about (its probes and the answers move them)."""
    return {
        tuple(t[k] for k in ("src", "sport", "dst", "dport")): (state, left)
        for state, left, t in _conntrack_tcp(address)
        if state in _HANDSHAKE_STATES or host_address not in (t["src"], t["dst"])
    }


def _moved(
    before: dict[tuple[str, ...], tuple[str, float]], after: dict[tuple[str, ...], tuple[str, float]]
) -> list[str]:
    """Connections that saw a packet between the two readings: new, or another state, or a timer
    restarted (a timeout only counts down between packets)."""
    return [
        f"{':'.join(key[:2])} -> {':'.join(key[2:])} {state} (moved)"
        for key, (state, left) in after.items()
        if key not in before or before[key][0] != state or left > before[key][1]
    ]


def describe(address: str) -> list[str]:
    """The host's view of the sandbox's connections, for a failed save's log: conntrack's entries
    (state, seconds left) and the host's sockets to it in TIME_WAIT."""
    entries = [
        f"{t['src']}:{t['sport']} -> {t['dst']}:{t['dport']} {state} {left:.0f}s"
        for state, left, t in _conntrack_tcp(address)
    ]
    waiting = [f"host TIME_WAIT {a}:{b} -> {c}:{d}" for a, b, c, d in _host_time_wait() if address in (a, c)]
    return entries + waiting


def reset_host_connections(address: str) -> None:
    """Reset every TCP connection between a host socket and ``address`` (SOCK_DESTROY via ``ss
    -K``): the host side is gone at once and the other end gets a RST, so it keeps no state."""
    proc = subprocess.run(["ss", "-K", "-t", "dst", address], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if proc.returncode != 0:
        raise network.NetworkError(f"ss -K failed: {proc.stderr.decode(errors='replace').strip()}")


def end_time_wait(
    address: str, host_address: str, since: float = 0.0, reopened: set[tuple[str, int, str, int]] | None = None
) -> int:
    """End the TIME_WAIT the sandbox may hold for connections from the host, as RFC 1122 allows: a
    new SYN from the same host port, with a larger sequence number (Linux's grow with time),
    reopens the connection, which the host then closes first. Its socket passes the gate
    (``GATE_PASS_MARK``). Returns how many it reopened.

    Every young TIME_WAIT of conntrack between the host and the sandbox is reopened once per quiet
    (``reopened``), also when the host's end waits in TIME_WAIT itself: that is a simultaneous
    close (both FINs crossed, e.g. an HTTP client that closes as soon as it has read a
    ``Connection: close`` answer), after which both ends wait, and which the host's view cannot
    tell from a close the host made first. Those host sockets are destroyed first (``ss -K``, which
    this kernel does for TIME_WAIT) so the port can connect again. A tuple reopened here ends with
    the host closing first (it waits for the sandbox's FIN after its own), so it is done."""
    done = reopened if reopened is not None else set()
    pending = [
        pair
        for pair in _young_time_wait(address, since)
        if pair[0] == host_address and pair[2] == address and pair not in done
    ]
    if not pending:
        return 0
    if any(pair in _host_time_wait() for pair in pending):
        _destroy_host_time_wait(address)
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(REOPEN_PARALLEL, len(pending))) as pool:
        outcomes = list(pool.map(_reopen, pending))
    # A SYN the sandbox did not answer (its TIME_WAIT saw a larger sequence number: the host sent
    # more than its ISN clock advanced) is tried again; the TIME_WAIT ends by itself within 60 s.
    done.update(pair for pair, outcome in zip(pending, outcomes, strict=True) if outcome != "timeout")
    return outcomes.count("reopened")


REOPEN_PARALLEL = 16


def _destroy_host_time_wait(address: str) -> None:
    proc = subprocess.run(
        ["ss", "-K", "-t", "state", "time-wait", "dst", address], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    if proc.returncode != 0:
        raise network.NetworkError(f"ss -K failed: {proc.stderr.decode(errors='replace').strip()}")


def _reopen(pair: tuple[str, int, str, int]) -> str:
    src, sport, dst, dport = pair
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, GATE_PASS_MARK)
        sock.settimeout(3.0)
        try:
            sock.bind((src, sport))
        except OSError:
            return "timeout"  # the host's port is taken meanwhile: tried again
        try:
            sock.connect((dst, dport))
        except TimeoutError:
            return "timeout"
        except OSError:
            return "refused"  # nothing listens there any more: the SYN ended the TIME_WAIT all the same
        # Closed from the host's side, to the end: the sandbox's server accepts it, reads the
        # EOF and closes too (a reset instead can leave its accept queue with a connected
        # endpoint, which fails the save). The host's end then waits in TIME_WAIT.
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(4096):
                pass
        return "reopened"


def open_connections(address: str, host_address: str, since: float = 0.0) -> list[str]:
    """TCP connections that ``address``'s end may still hold, from the host's conntrack table
    (call after ``reset_host_connections``), but those with the host (``host_address``) past
    their handshake: conntrack shows only its last guess of their state (a reset it saw is not
    one the sandbox took), so ``sweep_host_pairs`` asks the sandbox's netstack about them. Open
    ones that saw a packet after ``since``, a time.time() of the start of the sandbox's netstack
    (entries older than that, in any state, were another sandbox's at the same address, or of a
    run of this one before its last restore); and closed ones with a host elsewhere whose end
    there may still wait in TIME_WAIT, i.e. the entry entered TIME_WAIT less than 60 s ago (and
    after ``since``)."""
    timeouts = _timeouts()
    host_sockets = _host_sockets()
    now = time.time()
    found = [
        f"{t['src']}:{t['sport']} -> {t['dst']}:{t['dport']} {state}"
        for state, remaining, t in _conntrack_tcp(address)
        if state in _OPEN_STATES
        # past the handshake, a connection with the host is the sweep's: it asks the sandbox
        and (state in _HANDSHAKE_STATES or host_address not in (t["src"], t["dst"]))
        and now - _idle_s(state, remaining, timeouts) >= since
        and not (
            # A host SYN the sandbox never answered (sent while it was being restored, or the gate
            # refused its retransmission) and whose host socket is gone: had the sandbox's netstack
            # taken it, its SYN-ACK (retransmitted after 1 s) would have moved the entry on.
            state == "SYN_SENT"
            and t["src"] == host_address
            and (t["src"], int(t["sport"]), t["dst"], int(t["dport"])) not in host_sockets
            and _idle_s(state, remaining, timeouts) >= UNANSWERED_SYN_S
        )
    ]
    for pair in _young_time_wait(address, since):
        if host_address not in (pair[0], pair[2]):
            found.append(f"{pair[0]}:{pair[1]} -> {pair[2]}:{pair[3]} TIME_WAIT")
    return found


def _young_time_wait(address: str, since: float) -> list[tuple[str, int, str, int]]:
    """(src, sport, dst, dport) of conntrack's TCP entries of ``address`` in TIME_WAIT for less
    than 60 s that began after ``since``."""
    timeouts = _timeouts()
    found = []
    for state, remaining, tuples in _conntrack_tcp(address):
        age = _idle_s(state, remaining, timeouts)
        if state == "TIME_WAIT" and age < PEER_TIME_WAIT_S + 1 and time.time() - age >= since:
            found.append((tuples["src"], int(tuples["sport"]), tuples["dst"], int(tuples["dport"])))
    return found


TIMEOUTS_FRESH_S = 10.0
_timeouts_read: tuple[float, dict[str, float]] | None = None  # (monotonic time of the read, the timeouts)


def _timeouts() -> dict[str, float]:
    """conntrack's TCP timeouts (s) by name: those of ``_TIMEOUT_OF`` and the two caps. Read again
    at most every ``TIMEOUTS_FRESH_S``: a quiet's every poll asks for them several times (11 sysctl
    files each), and an operator's change is seen within that."""
    global _timeouts_read
    now = time.monotonic()
    if _timeouts_read is None or now - _timeouts_read[0] > TIMEOUTS_FRESH_S:
        names = {*_TIMEOUT_OF.values(), "max_retrans", "unacknowledged"}
        path = "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_{}"
        _timeouts_read = (now, {name: float(Path(path.format(name)).read_text()) for name in names})
    return _timeouts_read[1]


def _idle_s(state: str, remaining: float, timeouts: dict[str, float]) -> float:
    """How long an entry in ``state`` with ``remaining`` seconds left has seen no packet, at least.
    Each packet restarts its timer with its state's timeout, except that conntrack caps a longer
    one at max_retrans or unacknowledged (300 s, while data is unacknowledged or retransmitted)
    and sets close's (10 s) on a reset: so ESTABLISHED's 5 days tell an entry's age only while more
    than 300 s are left (one with less may have seen a packet just now). Of the timeouts it may
    have been given (at least ``remaining``), the shortest gives the youngest it can be."""
    own = timeouts[_TIMEOUT_OF[state]]
    given = {own, min(own, timeouts["max_retrans"]), min(own, timeouts["unacknowledged"]), timeouts["close"]}
    return min((timeout - remaining for timeout in given if timeout >= remaining), default=0.0)


def _conntrack_tcp(address: str) -> list[tuple[str, float, dict[str, str]]]:
    """(state, seconds left, original tuple and "assured": "[ASSURED]" where its handshake completed,
    else "") of conntrack's TCP entries to or from ``address``."""
    try:
        lines = CONNTRACK.read_text().splitlines()
    except FileNotFoundError:
        raise network.NetworkError(
            f"{CONNTRACK} is missing (nf_conntrack): the sandbox's connections are unknown"
        ) from None
    found = []
    for line in lines:
        fields = line.split()
        if len(fields) < 10 or fields[2] != "tcp":
            continue
        tuples: dict[str, str] = {}
        for item in fields[6:]:
            key, _, value = item.partition("=")
            if key in _TUPLE:
                tuples.setdefault(key, value)  # the original direction's tuple comes first
        if address in (tuples.get("src"), tuples.get("dst")):
            tuples["assured"] = "[ASSURED]" if "[ASSURED]" in fields else ""
            found.append((fields[5], float(fields[4]), tuples))
    return found


def _host_time_wait() -> set[tuple[str, int, str, int]]:
    """(local, local port, remote, remote port) of the host's IPv4 TCP sockets in TIME_WAIT."""
    return {pair for pair, state in _host_sockets().items() if state == "06"}


def _host_sockets() -> dict[tuple[str, int, str, int], str]:
    """The host's IPv4 TCP sockets: (local, local port, remote, remote port) -> state (hex, as in
    /proc/net/tcp)."""
    found = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        (local, lport), (remote, rport) = (field.split(":") for field in fields[1:3])
        found[(_hex_ip(local), int(lport, 16), _hex_ip(remote), int(rport, 16))] = fields[3]
    return found


def _hex_ip(value: str) -> str:
    return str(ipaddress.IPv4Address(int.from_bytes(bytes.fromhex(value), "little")))
