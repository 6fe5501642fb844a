"""Sandbox networking: one netns per sandbox, a routed veth /30 to the host, nftables policy.

The only module that runs ``ip`` and ``nft``: nftables through libnftables in this process (the
library the ``nft`` command is built on; one batch ~0.3 ms of CPU where an exec of ``nft`` costs ~5
ms), so a sandbox's rules are one batch at create and one at destroy; a new sandbox's veth, addresses
and route over rtnetlink in this process (``netlink.py``); ``ip`` execs only off the create path
(removing a netns and its veth, the first netns on a host, a microVM's tap).

Policy (table ``inet pmoves_e2b``, shared by every backend instance on the host):
- the host may connect into any sandbox (to envd and every other port);
- a sandbox cannot reach the host (input from sandbox veths is dropped except replies),
  other sandboxes, or private / link-local / loopback / CGNAT ranges;
- a sandbox reaches the internet (masqueraded via the host's default route) only while its
  address is in the ``internet4`` set; such a sandbox may also use the host's DNS resolvers
  (``resolvers4``, from /etc/resolv.conf) even when they sit in a private range. Sandboxes get no
  IPv6 at all;

Egress policy (table ``inet pmoves_e2b_egress``, a later hook priority; a drop there is final even
after the first table accepted):
- no sandbox reaches the subnets of the host's default-route interfaces or their gateways
  (``hostnets4``: maybe public addresses, a cloud VM's LAN), refreshed on every host setup;
- a sandbox's own ``allowOut`` / ``denyOut`` CIDRs live in its chain ``egress_<slot>``, reached via
  the ``egress4`` verdict map; allow is checked before deny, so allow wins.

Connection tracking (table ``inet pmoves_e2b_conns``, after both): the host's conntrack table is one
per host, and a full one drops every new connection of the host and of every sandbox. The
connections a sandbox gets through the host are counted per sandbox address (``ct count``, set
``conns4``) and a new one beyond ``CONNS_PER_SANDBOX`` is dropped before the kernel confirms it, so
it never takes a table entry. Connections to the host itself are dropped by ``input`` before that.
"""

from __future__ import annotations

import ctypes
import fcntl
import ipaddress
import json
import logging
import os
import socket
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pmoves_e2b.sandbox.backends.ns import netlink

log = logging.getLogger(__name__)

T = TypeVar("T")

TABLE = "pmoves_e2b"
# Bump when the rules below change: an older table is then replaced on start.
RULES_VERSION = "v2"
SANDBOX_NET = ipaddress.IPv4Network("10.77.0.0/16")
HOST_VETH_PREFIX = "e2bh"
NETNS_PREFIX = "e2b-"
# a clean netns kept for the next sandbox (``recycle``): "." is in no sandbox id, so no name clashes
FREE_NETNS_PREFIX = NETNS_PREFIX + "free."
NETNS_DIR = Path("/run/netns")
LOCK_FILE = Path("/run/pmoves-e2b/nft.lock")
MAX_SLOTS = SANDBOX_NET.num_addresses // 4

BLOCKED_V4 = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4", "240.0.0.0/4",
)  # fmt: skip

RULESET = f"""
table inet {TABLE} {{
  chain {RULES_VERSION} {{ }}
  set internet4 {{ type ipv4_addr; }}
  set resolvers4 {{ type ipv4_addr; }}
  set blocked4 {{ type ipv4_addr; flags interval; elements = {{ {", ".join(BLOCKED_V4)} }} }}
  chain input {{
    type filter hook input priority -10; policy accept;
    iifname "{HOST_VETH_PREFIX}*" ct state established,related accept
    iifname "{HOST_VETH_PREFIX}*" drop
  }}
  chain forward {{
    type filter hook forward priority -10; policy accept;
    iifname "{HOST_VETH_PREFIX}*" meta nfproto ipv6 drop
    iifname "{HOST_VETH_PREFIX}*" ip saddr @internet4 ip daddr @resolvers4 meta l4proto {{ tcp, udp }} \
      th dport 53 accept
    iifname "{HOST_VETH_PREFIX}*" ip daddr @blocked4 drop
    iifname "{HOST_VETH_PREFIX}*" ip saddr @internet4 accept
    iifname "{HOST_VETH_PREFIX}*" drop
    oifname "{HOST_VETH_PREFIX}*" ct state established,related accept
    oifname "{HOST_VETH_PREFIX}*" drop
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname != "{HOST_VETH_PREFIX}*" ip saddr @internet4 masquerade
  }}
}}
"""

EGRESS_TABLE = "pmoves_e2b_egress"
EGRESS_RULES_VERSION = "v1"
EGRESS_RULESET = f"""
table inet {EGRESS_TABLE} {{
  chain {EGRESS_RULES_VERSION} {{ }}
  set hostnets4 {{ type ipv4_addr; flags interval; auto-merge; }}
  set resolvers4 {{ type ipv4_addr; }}
  map egress4 {{ type ipv4_addr : verdict; }}
  chain forward {{
    type filter hook forward priority -5; policy accept;
    iifname "{HOST_VETH_PREFIX}*" ip daddr @resolvers4 meta l4proto {{ tcp, udp }} th dport 53 accept
    iifname "{HOST_VETH_PREFIX}*" ip daddr @hostnets4 drop
    iifname "{HOST_VETH_PREFIX}*" ip saddr vmap @egress4
  }}
}}
"""

CONNS_TABLE = "pmoves_e2b_conns"
CONNS_RULES_VERSION = "v1"
# 64 sandboxes at this cap fill half of the kernel's default nf_conntrack_max (262,144); a sandbox's
# browser or crawler uses a few hundred at most.
CONNS_PER_SANDBOX = 2048
CONNS_RULESET = f"""
table inet {CONNS_TABLE} {{
  chain {CONNS_RULES_VERSION} {{ }}
  set conns4 {{ type ipv4_addr; size {MAX_SLOTS}; flags dynamic; }}
  chain forward {{
    type filter hook forward priority 0; policy accept;
    iifname "{HOST_VETH_PREFIX}*" ct state new add @conns4 {{ ip saddr ct count over {CONNS_PER_SANDBOX} }} drop
  }}
}}
"""

CLONE_NEWNET = 0x40000000
MS_BIND = 0x1000
MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)


class NetworkError(RuntimeError):
    pass


@dataclass(frozen=True)
class SandboxNet:
    """The network of one sandbox; everything derives from its slot number and id."""

    slot: int
    netns: str

    @classmethod
    def for_slot(cls, slot: int, sandbox_id: str) -> SandboxNet:
        if not 0 <= slot < MAX_SLOTS:
            raise NetworkError(f"slot {slot} is outside the sandbox network {SANDBOX_NET}")
        return cls(slot=slot, netns=NETNS_PREFIX + sandbox_id)

    @property
    def host_veth(self) -> str:
        return f"{HOST_VETH_PREFIX}{self.slot}"

    @property
    def host_address(self) -> str:
        return str(SANDBOX_NET.network_address + 4 * self.slot + 1)

    @property
    def address(self) -> str:
        return str(SANDBOX_NET.network_address + 4 * self.slot + 2)

    @property
    def netns_path(self) -> Path:
        return NETNS_DIR / self.netns


def _run(argv: list[str], stdin: str = "") -> None:
    proc = subprocess.run(argv, input=stdin.encode(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if proc.returncode != 0:
        raise NetworkError(f"{' '.join(argv)} failed: {proc.stderr.decode(errors='replace').strip()}")


class _Nft:
    """libnftables (``libnftables.so.1``, installed with the ``nft`` command): a script runs as one
    atomic transaction, as with ``nft -f -``. One context, used under a lock (it is not thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tried = False
        self._loaded: tuple[ctypes.CDLL, int] | None = None

    def _context(self) -> tuple[ctypes.CDLL, int] | None:
        if not self._tried:
            self._tried = True
            try:
                lib = ctypes.CDLL("libnftables.so.1")
            except OSError:
                return None  # no library: the nft command (same rules, an exec each)
            lib.nft_ctx_new.restype = ctypes.c_void_p
            lib.nft_ctx_new.argtypes = (ctypes.c_uint32,)
            for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
                getattr(lib, name).argtypes = (ctypes.c_void_p,)
            lib.nft_run_cmd_from_buffer.argtypes = (ctypes.c_void_p, ctypes.c_char_p)
            for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
                getattr(lib, name).argtypes = (ctypes.c_void_p,)
                getattr(lib, name).restype = ctypes.c_char_p
            ctx = lib.nft_ctx_new(0)
            if ctx:
                lib.nft_ctx_buffer_output(ctx)
                lib.nft_ctx_buffer_error(ctx)
                self._loaded = (lib, ctx)
        return self._loaded

    def run(self, script: str) -> str:
        """Run ``script``; its output (for ``list``), or NetworkError with nft's message."""
        with self._lock:
            loaded = self._context()
            if loaded is not None:
                lib, ctx = loaded
                rc = lib.nft_run_cmd_from_buffer(ctx, script.encode())
                output = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode(errors="replace")
                error = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
                if rc != 0:
                    raise NetworkError(f"nft failed: {error.strip()}")
                return output
        proc = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True)
        if proc.returncode != 0:
            raise NetworkError(f"nft failed: {proc.stderr.strip()}")
        return proc.stdout


_nft = _Nft()


def nft(script: str) -> str:
    """Run an nft script (one transaction: all of it or nothing) and return its output."""
    return _nft.run(script)


def ensure_table(family: str, table: str, version: str, ruleset: str) -> None:
    """Create ``table`` from ``ruleset`` when missing, or replace it when its version chain (a chain
    named ``version``) says it is outdated; a current one is left as it is (its sets keep their elements)."""
    try:
        listing = nft(f"list table {family} {table}")
    except NetworkError:
        listing = ""
    if f"chain {version} " not in listing:
        nft((f"delete table {family} {table}\n" if listing else "") + ruleset)


def ensure_host_setup() -> None:
    """Create the nft table (once per host, under a lock), refresh the resolver set from
    /etc/resolv.conf and enable IPv4 forwarding."""
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for table, version, ruleset in (
            (TABLE, RULES_VERSION, RULESET),
            (EGRESS_TABLE, EGRESS_RULES_VERSION, EGRESS_RULESET),
            (CONNS_TABLE, CONNS_RULES_VERSION, CONNS_RULESET),
        ):
            ensure_table("inet", table, version, ruleset)
        resolvers = host_resolvers()
        for table in (TABLE, EGRESS_TABLE):
            elements = f"add element inet {table} resolvers4 {{ {', '.join(resolvers)} }}\n" if resolvers else ""
            nft(f"flush set inet {table} resolvers4\n{elements}")
        nets = host_networks()
        elements = f"add element inet {EGRESS_TABLE} hostnets4 {{ {', '.join(nets)} }}\n" if nets else ""
        nft(f"flush set inet {EGRESS_TABLE} hostnets4\n{elements}")
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1")


def host_resolvers(resolv_conf: Path = Path("/etc/resolv.conf")) -> list[str]:
    """IPv4 name servers of the host that a sandbox could reach by routing (not loopback)."""
    found = []
    try:
        lines = resolv_conf.read_text().splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                address = ipaddress.IPv4Address(parts[1])
            except ValueError:
                continue
            if not address.is_loopback and not address.is_unspecified:
                found.append(str(address))
    return found


def host_networks() -> list[str]:
    """Subnets of the interfaces that carry the host's default routes, and their gateways: the
    host's LAN (and a cloud's metadata and neighbours on it), which no sandbox may reach."""
    routes = json.loads(subprocess.run(["ip", "-4", "-j", "route", "show", "default"], capture_output=True,
                                       text=True, check=True).stdout or "[]")  # fmt: skip
    found: set[ipaddress.IPv4Network] = set()
    for route in routes:
        if route.get("gateway"):
            found.add(ipaddress.IPv4Network(route["gateway"]))
        if not route.get("dev"):
            continue
        links = json.loads(subprocess.run(["ip", "-4", "-j", "addr", "show", "dev", route["dev"]], capture_output=True,
                                          text=True, check=True).stdout or "[]")  # fmt: skip
        for link in links:
            for info in link.get("addr_info", []):
                found.add(ipaddress.IPv4Network(f"{info['local']}/{info['prefixlen']}", strict=False))
    # Our own sandbox range is handled by the rules above; never list it here.
    return [str(net) for net in ipaddress.collapse_addresses(found) if not net.overlaps(SANDBOX_NET)]


def in_netns(netns_path: Path, work: Callable[[], T], what: str) -> T:
    """Run ``work`` inside a netns on a throwaway thread (setns is per thread, and the thread
    ends right after, so its switched netns never leaks into other work)."""
    results: list[T] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {netns_path}")
            finally:
                os.close(fd)
            results.append(work())
        except BaseException as exc:  # noqa: BLE001 - reported to the caller below
            errors.append(exc)

    thread = threading.Thread(target=worker, name=f"netns-{what}")
    thread.start()
    thread.join()
    if errors:
        raise NetworkError(f"{what} in {netns_path}: {errors[0]}")
    return results[0]


def _write_sysctls(values: dict[str, str]) -> None:
    """Write /proc/sys/net values of the calling thread's netns."""
    for key, value in values.items():
        Path("/proc/sys", key.replace(".", "/")).write_text(value)


def _write_sysctls_in_netns(netns_path: Path, values: dict[str, str]) -> None:
    """Write /proc/sys/net values inside a netns."""
    in_netns(netns_path, lambda: _write_sysctls(values), "sysctls")


_netns_dir_seen = False


def _netns_dir_mounted() -> bool:
    """Whether ``ip`` has made /run/netns a (shared) mount point. From mountinfo: a bind mount of
    the dir onto itself has its parent's device, so ``os.path.ismount`` says no."""
    global _netns_dir_seen
    if not _netns_dir_seen:
        target = str(NETNS_DIR)
        with open("/proc/self/mountinfo") as mountinfo:
            _netns_dir_seen = any(line.split()[4] == target for line in mountinfo)
    return _netns_dir_seen


# Each sandbox netns gets a TCP established-hash of its own (``tcp_child_ehash_entries``, Linux 6.1+)
# instead of sharing the host's (262,144 buckets here): the dump that cleans a netns for reuse walks
# that table (~1.3 ms a family on the host's, ~0.1 ms on this), and a sandbox's sockets no longer sit
# in the host's hash chains. 16,384 buckets (128 KB) keep chains short for a sandbox's thousands.
CHILD_TCP_EHASH = 16384
_parent_lock = threading.Lock()
_parent: list[int | None] = []  # [fd] once tried (None: this kernel has no per-netns TCP hash)


def _netns_parent() -> int | None:
    """An fd of an empty netns of this process whose ``tcp_child_ehash_entries`` is set: a netns is
    made from it (the kernel reads the sysctl of the netns that makes one). None without support."""
    with _parent_lock:
        if not _parent:

            def make() -> None:
                # on a thread of its own: unshare moves only it, and it ends right after
                try:
                    if _libc.unshare(CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
                    Path("/proc/sys/net/ipv4/tcp_child_ehash_entries").write_text(str(CHILD_TCP_EHASH))
                    results.append(os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC))
                except OSError as exc:  # an older kernel: the host's hash, as before
                    log.info("sandbox netns share the host's TCP hash: %s", exc)

            results: list[int] = []
            thread = threading.Thread(target=make, name="netns-parent")
            thread.start()
            thread.join()
            _parent.append(results[0] if results else None)
        return _parent[0]


def create_netns(net: SandboxNet) -> None:
    """What ``ip netns add`` does, without an exec: a fresh netns bind-mounted on /run/netns/NAME
    (enough for the sandbox's launcher to join it; the rest is ``configure``)."""
    if not _netns_dir_mounted():
        _run(["ip", "netns", "add", net.netns])  # first use on this host: ip sets up /run/netns
        return
    os.close(os.open(net.netns_path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
    errors: list[BaseException] = []
    parent = _netns_parent()

    def worker() -> None:
        # unshare(CLONE_NEWNET) moves only this thread, which ends right after
        try:
            if parent is not None and _libc.setns(parent, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns into the netns parent")
            if _libc.unshare(CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
            source, target = b"/proc/thread-self/ns/net", str(net.netns_path).encode()
            if _libc.mount(source, target, None, MS_BIND, None) != 0:
                raise OSError(ctypes.get_errno(), f"bind mount on {net.netns_path}")
        except BaseException as exc:  # noqa: BLE001 - reported to the caller below
            errors.append(exc)

    thread = threading.Thread(target=worker, name="netns-create")
    thread.start()
    thread.join()
    if errors:
        net.netns_path.unlink(missing_ok=True)
        raise NetworkError(f"cannot create netns {net.netns}: {errors[0]}")


def _host_sysctl(key: str) -> dict[str, str]:
    try:
        return {key: Path("/proc/sys", key.replace(".", "/")).read_text().strip()}
    except OSError:
        return {}


# root inside the sandbox may bind low ports and open ICMP echo sockets; no IPv6; the host's limits
# of TIME_WAIT and half-open connections (a netns with its own TCP hash would derive smaller ones
# from its size; with the host's hash it had these)
SANDBOX_SYSCTLS = {
    "net.ipv4.ip_unprivileged_port_start": "0",
    "net.ipv4.ping_group_range": "0 2147483647",
    "net.ipv6.conf.all.disable_ipv6": "1",
    "net.ipv6.conf.default.disable_ipv6": "1",
    **_host_sysctl("net.ipv4.tcp_max_tw_buckets"),
    **_host_sysctl("net.ipv4.tcp_max_syn_backlog"),
}


# The veth's MACs when they must not change between sandboxes (gVisor: a restored netstack keeps
# the gateway's MAC it had learnt; every veth pair is its own link, so one pair of MACs serves all).
FIXED_MACS = ("02:e2:b0:00:00:01", "02:e2:b0:00:00:02")  # host end, sandbox end


def configure(net: SandboxNet, allow_internet: bool, fixed_macs: bool = False) -> None:
    """veth /30 to the host, address, routes and sysctls inside, and the internet policy. May run
    in parallel with the sandbox's start: it only has to be done before the sandbox is handed out.
    Over rtnetlink in this process (what ``ip`` sends; two ``ip`` execs cost ~5 ms of CPU)."""
    fd = os.open(net.netns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        netlink.add_veth(net.host_veth, "eth0", fd, FIXED_MACS if fixed_macs else None)
        netlink.add_address(net.host_veth, net.host_address, 30)
        netlink.set_up(net.host_veth)
    except OSError as exc:
        raise NetworkError(f"veth {net.host_veth} of {net.netns}: {exc}") from exc
    finally:
        os.close(fd)
    Path(f"/proc/sys/net/ipv6/conf/{net.host_veth}/disable_ipv6").write_text("1")

    def inside() -> None:
        _write_sysctls(SANDBOX_SYSCTLS)
        netlink.add_address("eth0", net.address, 30)
        netlink.set_up("eth0")
        netlink.set_up("lo")
        netlink.add_default_route(net.host_address)

    in_netns(net.netns_path, inside, "configure")
    apply_policy(net, allow_internet)


def apply_policy(net: SandboxNet, allow_internet: bool) -> None:
    """One transaction: an empty egress chain of our own (never one a crashed predecessor left in
    this slot) and the internet permission."""
    nft("\n".join([*_egress_batch(net, (), ()), *_internet_batch(net, allow_internet)]) + "\n")


def readdress(net: SandboxNet) -> None:
    """Give the sandbox's eth0 its address and default route again (gVisor's netstack takes them
    off when it takes the device over, and copies them from there when it starts or restores)."""
    _run(
        ["ip", "-n", net.netns, "-batch", "-"],
        f"addr replace {net.address}/30 dev eth0\nroute replace default via {net.host_address}\n",
    )


def _internet_batch(net: SandboxNet, allowed: bool) -> list[str]:
    element = f"inet {TABLE} internet4 {{ {net.address} }}"
    # nft 1.0 has no "delete if present": add, then delete, in one transaction
    return [f"add element {element}"] if allowed else [f"add element {element}", f"delete element {element}"]


def set_internet(net: SandboxNet, allowed: bool) -> None:
    nft("\n".join(_internet_batch(net, allowed)) + "\n")


def _egress_chain(net: SandboxNet) -> str:
    return f"egress_{net.slot}"


def _cidr_set(cidrs: tuple[str, ...]) -> str:
    nets = ipaddress.collapse_addresses(ipaddress.IPv4Network(c, strict=False) for c in cidrs)
    return ", ".join(str(n) for n in nets)


def _egress_batch(net: SandboxNet, allow: tuple[str, ...], deny: tuple[str, ...]) -> list[str]:
    chain = _egress_chain(net)
    batch = [
        f"add chain inet {EGRESS_TABLE} {chain}",
        f"flush chain inet {EGRESS_TABLE} {chain}",
        f"add element inet {EGRESS_TABLE} egress4 {{ {net.address} : jump {chain} }}",
    ]
    if allow:
        batch.append(f"add rule inet {EGRESS_TABLE} {chain} ip daddr {{ {_cidr_set(allow)} }} accept")
    if deny:
        batch.append(f"add rule inet {EGRESS_TABLE} {chain} ip daddr {{ {_cidr_set(deny)} }} drop")
    return batch


def set_egress(net: SandboxNet, allow: tuple[str, ...], deny: tuple[str, ...]) -> None:
    """Replace the sandbox's allowOut/denyOut CIDR rules (one atomic nft batch). Allow is checked
    first, so it takes precedence; anything neither allowed nor denied follows ``internet4``."""
    nft("\n".join(_egress_batch(net, allow, deny)) + "\n")


def forget(net: SandboxNet) -> None:
    """Remove every rule of the sandbox's address, in one transaction, whichever are there: its
    internet permission, its egress chain and map entry, and its connection count (so the next
    sandbox in its slot starts at 0). Each is added first, so that deleting it cannot fail."""
    chain = _egress_chain(net)
    egress = f"inet {EGRESS_TABLE} egress4 {{ {net.address} : jump {chain} }}"
    conns = f"inet {CONNS_TABLE} conns4 {{ {net.address} }}"
    batch = [
        *_internet_batch(net, False),
        f"add chain inet {EGRESS_TABLE} {chain}",
        f"add element {egress}",
        f"delete element inet {EGRESS_TABLE} egress4 {{ {net.address} }}",
        f"flush chain inet {EGRESS_TABLE} {chain}",
        f"delete chain inet {EGRESS_TABLE} {chain}",
        f"add element {conns}",
        f"delete element {conns}",
    ]
    nft("\n".join(batch) + "\n")


INTERCEPT_TABLE = "pmoves_e2b_intercept"
INTERCEPT_PORTS = (80, 443)


def open_intercept(net: SandboxNet) -> socket.socket:
    """A listening socket inside the sandbox's netns that its outbound TCP to ports 80/443 is
    redirected to (nft in that netns, which root inside cannot change: the netns belongs to the
    host's user namespace). The service serves it: see ``sandbox/egress.py``."""

    def listen() -> socket.socket:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        return listener

    listener = in_netns(net.netns_path, listen, "egress listener")
    port = listener.getsockname()[1]
    ports = ", ".join(str(p) for p in INTERCEPT_PORTS)
    rules = (
        f"table ip {INTERCEPT_TABLE}\ndelete table ip {INTERCEPT_TABLE}\n"
        f"table ip {INTERCEPT_TABLE} {{\n  chain output {{\n    type nat hook output priority -100; policy accept;\n"
        f"    ip daddr != 127.0.0.0/8 tcp dport {{ {ports} }} redirect to :{port}\n  }}\n}}\n"
    )
    try:
        _run(["nsenter", f"--net={net.netns_path}", "nft", "-f", "-"], rules)
    except NetworkError:
        listener.close()
        raise
    return listener


def close_intercept(net: SandboxNet) -> None:
    """Stop redirecting (the listener itself is closed by its owner)."""
    if net.netns_path.exists():
        _run(["nsenter", f"--net={net.netns_path}", "nft", "-f", "-"],
             f"table ip {INTERCEPT_TABLE}\ndelete table ip {INTERCEPT_TABLE}\n")  # fmt: skip


def never_reachable() -> list[ipaddress.IPv4Network]:
    """What no sandbox may reach, also through the egress proxy (which connects from the host)."""
    nets = [ipaddress.IPv4Network(n) for n in BLOCKED_V4] + [SANDBOX_NET]
    # The proxy connects from the host: the host's own addresses on every interface are out too.
    links = json.loads(subprocess.run(["ip", "-4", "-j", "addr"], capture_output=True, text=True, check=True).stdout)
    own = [ipaddress.IPv4Network(info["local"]) for link in links for info in link.get("addr_info", [])]
    return nets + own + [ipaddress.IPv4Network(n) for n in host_networks()]


def destroy(net: SandboxNet) -> None:
    """Remove the sandbox's rules, its veth and its netns; tolerant of parts already gone (~30 ms)."""
    forget(net)
    commands = []
    if Path(f"/sys/class/net/{net.host_veth}").exists():
        commands.append(f"link del {net.host_veth}\n")
    # the slot's kept netns too: a crash between recycle's steps can leave it (the slot is this
    # sandbox's, so no one else's can be there)
    for name in dict.fromkeys((net.netns, free_netns(net.slot))):
        if (NETNS_DIR / name).exists():
            commands.append(f"netns del {name}\n")
    if commands:
        _run(["ip", "-force", "-batch", "-"], "".join(commands))


def destroy_free(slot: int) -> None:
    """Remove a kept netns of ``slot`` (and its veth, and any rule of the slot's address)."""
    destroy(SandboxNet(slot=slot, netns=free_netns(slot)))


# --- reuse: a released sandbox's netns, cleaned, for the next sandbox ----------------------------


def free_netns(slot: int) -> str:
    return f"{FREE_NETNS_PREFIX}{slot}"


def free_slot_of(name: str) -> int | None:
    """The slot of a kept netns's name (None for any other name)."""
    tail = name.removeprefix(FREE_NETNS_PREFIX)
    return int(tail) if tail != name and tail.isdigit() else None


def _rename_netns(old: str, new: str) -> None:
    """Move a netns's name: bind its mount on the new name, then detach the old one."""
    old_path, new_path = NETNS_DIR / old, NETNS_DIR / new
    os.close(os.open(new_path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
    if _libc.mount(str(old_path).encode(), str(new_path).encode(), None, MS_BIND, None) != 0:
        err = ctypes.get_errno()
        new_path.unlink(missing_ok=True)
        raise NetworkError(f"cannot name netns {old} {new}: {os.strerror(err)}")
    if _libc.umount2(str(old_path).encode(), MNT_DETACH) != 0:
        raise NetworkError(f"cannot drop the name {old} of netns {new}: {os.strerror(ctypes.get_errno())}")
    old_path.unlink(missing_ok=True)


def _sockstat() -> dict[str, int]:
    """This thread's netns's socket counts: {"TCP.inuse": n, "TCP.tw": n, "UDP.inuse": n, ...}."""
    counts: dict[str, int] = {}
    for name in ("sockstat", "sockstat6"):
        for line in Path(f"/proc/thread-self/net/{name}").read_text().splitlines():
            kind, _, fields = line.partition(":")
            values = fields.split()
            for key, value in zip(values[::2], values[1::2], strict=False):
                counts[f"{kind}.{key}"] = counts.get(f"{kind}.{key}", 0) + int(value)
    return counts


def _clean_inside(net: SandboxNet) -> str:
    """Make a netns whose processes are all gone as ``configure`` left it; "" when done, else why
    it cannot be (then it must not be reused). Runs on a thread inside the netns."""
    if netlink.nft_table_count():
        return "it has nftables rules (a domain-rule intercept)"
    stat = _sockstat()
    if stat.get("TCP.inuse", 0) or stat.get("TCP.tw", 0) or stat.get("TCP6.inuse", 0):
        # left by the dead sandbox: TIME_WAIT and closing sockets, which would make its ports
        # busy for the next one; a listener can only be the host's (the egress intercept)
        if netlink.abort_tcp_sockets() is None:
            return "a TCP listener is open in it"
        stat = _sockstat()  # counted again only when something was aborted (this runs on every kill)
    busy = {key: n for key, n in stat.items() if key.endswith((".inuse", ".tw")) and n and not key.startswith("FRAG")}
    if busy:
        return f"sockets are still open in it: {busy}"
    if Path("/proc/thread-self/net/unix").read_text().count("\n") > 1:
        return "unix sockets are still open in it"
    netlink.flush_tcp_metrics()  # which hosts it talked to (RTT, Fast Open cookies)
    netlink.flush_conntrack()
    Path("/proc/sys/net/ipv4/route/flush").write_text("1")  # learned PMTU and redirects
    for key, value in SANDBOX_SYSCTLS.items():
        path = Path("/proc/sys", key.replace(".", "/"))
        # written only when changed: a disable_ipv6 write takes the RTNL lock (and retries the
        # syscall while another netns is being configured), even when the value stays
        if path.read_text().split() != value.split():
            path.write_text(value)
    return ""


def recycle(net: SandboxNet) -> str:
    """Clean the netns of a sandbox whose processes are all gone and keep it under the slot's free
    name (``free_netns``), veth, addresses and routes included; "" when done, else why not (the
    caller then destroys it). Root inside a sandbox never had CAP_NET_ADMIN over its netns (the
    netns belongs to the host's user namespace), so addresses, routes, links, sysctls and nftables
    there are as ``configure`` made them; what it could change is socket state and caches, which is
    what this clears. Not for a netns runsc or QEMU used (they change its interfaces)."""
    if not Path(f"/sys/class/net/{net.host_veth}").exists() or not net.netns_path.exists():
        return "its veth or netns is gone"
    forget(net)
    # the host's tracking of what it started (its NAT mappings), closed connections' entries
    # included: a late segment of the previous sandbox's connection must not reach the next one.
    # (Skipping this walk when no connection was open left TIME_WAIT entries: a CI run saw one.)
    netlink.delete_conntrack_from(net.address)
    why = in_netns(net.netns_path, lambda: _clean_inside(net), "recycle")
    if why:
        return why
    _rename_netns(net.netns, free_netns(net.slot))
    return ""


def take_free_netns(net: SandboxNet) -> None:
    """Give the kept netns of ``net.slot`` the sandbox's name; its policy is ``apply_policy``'s.
    Done before anything enters ``net.netns_path``: until the bind, that path is missing or a plain
    file, and setns on it fails with EINVAL."""
    _rename_netns(free_netns(net.slot), net.netns)


def destroy_netns(name: str) -> None:
    """Remove a sandbox netns known only by name (its veth goes with it)."""
    if (NETNS_DIR / name).exists():
        _run(["ip", "netns", "del", name])


def _elements(*what: str) -> set[str]:
    try:
        text = nft(f"list {' '.join(what)}")
    except NetworkError:
        return set()
    if "elements = {" not in text:
        return set()
    body = text.split("elements = {", 1)[1].split("}", 1)[0]
    return {item.split(":")[0].strip() for item in body.replace("\n", " ").split(",") if item.strip()}


def internet_addresses() -> set[str]:
    return _elements("set", "inet", TABLE, "internet4")


def egress_addresses() -> set[str]:
    """Sandbox addresses that have an egress chain (every configured sandbox has one)."""
    return _elements("map", "inet", EGRESS_TABLE, "egress4")


def list_netns() -> list[str]:
    """Names of the sandbox network namespaces on this host (any backend instance)."""
    try:
        return sorted(name for name in os.listdir(NETNS_DIR) if name.startswith(NETNS_PREFIX))
    except FileNotFoundError:
        return []


def slot_of_address(address: str) -> int | None:
    ip = ipaddress.IPv4Address(address)
    if ip not in SANDBOX_NET:
        return None
    return (int(ip) - int(SANDBOX_NET.network_address)) // 4


VM_TABLE = "pmoves_e2b_vm"


def attach_vm_tap(net: SandboxNet, tap: str, tap_address: str, guest_address: str, prefix: int, tap_mac: str) -> None:
    """A tap device for a microVM inside the sandbox's netns (after ``configure``): the guest sits
    behind it at a fixed private address, and the sandbox address is translated to and from it, so
    the host reaches the guest at ``net.address`` and the host's per-address rules hold for it."""
    _run(
        ["ip", "-n", net.netns, "-batch", "-"],
        f"tuntap add dev {tap} mode tap\n"
        f"link set {tap} address {tap_mac}\n"
        f"addr add {tap_address}/{prefix} dev {tap}\n"
        f"link set {tap} up\n",
    )
    _write_sysctls_in_netns(net.netns_path, {"net.ipv4.ip_forward": "1"})
    rules = (
        f"table ip {VM_TABLE} {{\n"
        "  chain prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n"
        f'    iifname "eth0" ip daddr {net.address} dnat to {guest_address}\n  }}\n'
        "  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n"
        f'    oifname "eth0" ip saddr {guest_address} snat to {net.address}\n  }}\n'
        "}\n"
    )
    _run(["nsenter", f"--net={net.netns_path}", "nft", "-f", "-"], rules)
