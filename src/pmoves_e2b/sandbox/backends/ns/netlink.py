"""The few netlink requests that make a used netns clean again, in this process (no ``ss`` or
``conntrack`` exec). Every call works in the netns of the calling thread: a netlink socket belongs
to the netns it was made in, so ``network.py`` calls these on its setns'd thread.

- ``abort_tcp_sockets``: sock_diag's SOCK_DESTROY on every TCP socket (TIME_WAIT included), as
  ``ss -K``, unless one listens (only the host can still hold a listener); one dump per family;
- ``flush_tcp_metrics``: the per-destination TCP metrics cache (RTT, cwnd, Fast Open cookies: which
  hosts the netns talked to), as ``ip tcp_metrics flush all``;
- ``nft_table_count``: tables of nftables in the netns;
- ``flush_conntrack`` / ``delete_conntrack_from``: connection tracking entries, all of the netns's
  or those one address started;
- ``add_veth``, ``add_address``, ``set_up``, ``add_default_route``: what ``ip link/addr/route add``
  send (rtnetlink), for a new sandbox's veth pair, addresses and route.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator

NETLINK_ROUTE = 0
NETLINK_SOCK_DIAG = 4
NETLINK_NETFILTER = 12
NETLINK_GENERIC = 16
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x300, 0x200, 0x400
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLA_F_NESTED = 0x8000
_HEADER = struct.Struct("=IHHII")

SOCK_DIAG_BY_FAMILY, SOCK_DESTROY = 20, 21
TCP_LISTEN = 10
# TCP_ESTABLISHED (1) .. TCP_NEW_SYN_RECV (12): every state a socket in a hash table can be in. Not
# "all bits": that includes TCP_BOUND_INACTIVE (13, bound and nothing else, only while a process holds
# its fd), whose dump walks the host-wide bind hash (~1.3 ms a family, on every kill).
TCP_STATES = sum(1 << state for state in range(1, 13))
_DIAG_REQ = struct.Struct("=BBBBI48s")  # inet_diag_req_v2: family, protocol, ext, pad, states, id
_DIAG_MSG_HEAD = struct.Struct("=BBBB48s")  # inet_diag_msg: family, state, timer, retrans, id

GENL_ID_CTRL, CTRL_CMD_GETFAMILY, CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME = 0x10, 3, 1, 2
TCP_METRICS_CMD_DEL = 2

NFNL_SUBSYS_CTNETLINK, NFNL_SUBSYS_NFTABLES = 1, 10
IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_DELETE = 1, 2
NFT_MSG_GETTABLE = 1
CTA_TUPLE_ORIG, CTA_ZONE, CTA_FILTER = 1, 18, 25
CTA_TUPLE_IP, CTA_IP_V4_SRC = 1, 1
CTA_FILTER_ORIG_FLAGS, CTA_FILTER_FLAG_CTA_IP_SRC = 1, 1


RTM_NEWLINK, RTM_NEWADDR, RTM_NEWROUTE = 16, 20, 24
_IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")  # ifaddrmsg: family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags
IFLA_ADDRESS, IFLA_IFNAME, IFLA_LINKINFO, IFLA_NET_NS_FD = 1, 3, 18, 28
IFLA_INFO_KIND, IFLA_INFO_DATA, VETH_INFO_PEER = 1, 2, 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_GATEWAY = 5
IFF_UP = 0x1
RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST = 254, 3, 0, 1


class NetlinkError(OSError):
    pass


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _attrs(data: bytes) -> Iterator[tuple[int, bytes, bytes]]:
    """(type without flags, payload, the whole attribute) of each attribute in ``data``."""
    offset = 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            return
        yield kind & ~NLA_F_NESTED, data[offset + 4 : offset + length], data[offset : offset + length]
        offset += (length + 3) & ~3


class _Socket:
    """One netlink socket; ``request`` sends a message and returns the payloads of its answer."""

    def __init__(self, protocol: int) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
        self.sock.bind((0, 0))
        self.seq = 0

    def __enter__(self) -> _Socket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def request(self, kind: int, flags: int, payload: bytes, ignore: tuple[int, ...] = ()) -> list[tuple[int, bytes]]:
        """Send one message; the (type, payload) of every answer up to DONE or the ACK. An error
        answer raises NetlinkError unless its errno is in ``ignore``."""
        self.seq += 1
        self.sock.send(_HEADER.pack(_HEADER.size + len(payload), kind, NLM_F_REQUEST | flags, self.seq, 0) + payload)
        answers: list[tuple[int, bytes]] = []
        while True:
            data = self.sock.recv(1 << 16)
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, mtype, _, seq, _ = _HEADER.unpack_from(data, offset)
                body = data[offset + _HEADER.size : offset + length]
                offset += (length + 3) & ~3
                if seq != self.seq:
                    continue
                if mtype == NLMSG_DONE:
                    return answers
                if mtype == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", body)[0]
                    if code and code not in ignore:
                        raise NetlinkError(code, f"netlink request {kind:#x}: {os.strerror(code)}")
                    return answers
                answers.append((mtype, body))
                if not flags & NLM_F_DUMP and not flags & NLM_F_ACK:
                    return answers


# --- sockets ----------------------------------------------------------------------------------


def _tcp_sockets(diag: _Socket) -> list[tuple[int, int, bytes]]:
    """(family, state, inet_diag_sockid) of every TCP socket of the netns: one dump per family, which
    walks the netns's established hash (its own: ``network.create_netns``) and the listeners."""
    found = []
    for family in (socket.AF_INET, socket.AF_INET6):
        request = _DIAG_REQ.pack(family, socket.IPPROTO_TCP, 0, 0, TCP_STATES, b"")
        for _, body in diag.request(SOCK_DIAG_BY_FAMILY, NLM_F_DUMP, request):
            msg_family, state, _, _, sockid = _DIAG_MSG_HEAD.unpack_from(body)
            found.append((msg_family, state, sockid))
    return found


def abort_tcp_sockets() -> int | None:
    """Abort every TCP socket of the netns (the peer gets a reset) and say how many there were; None,
    and nothing aborted, when one of them listens."""
    with _Socket(NETLINK_SOCK_DIAG) as diag:
        sockets = _tcp_sockets(diag)
        if any(state == TCP_LISTEN for _, state, _ in sockets):
            return None
        for family, _, sockid in sockets:
            request = _DIAG_REQ.pack(family, socket.IPPROTO_TCP, 0, 0, TCP_STATES, sockid)
            diag.request(SOCK_DESTROY, NLM_F_ACK, request, ignore=(errno.ENOENT,))  # gone meanwhile
        return len(sockets)


# --- TCP metrics ------------------------------------------------------------------------------

_family_ids: dict[str, int] = {}


def _genl_family(genl: _Socket, name: str) -> int:
    if name not in _family_ids:
        header = struct.pack("=BBH", CTRL_CMD_GETFAMILY, 1, 0)
        answers = genl.request(GENL_ID_CTRL, NLM_F_ACK, header + _attr(CTRL_ATTR_FAMILY_NAME, name.encode() + b"\0"))
        for _, body in answers:
            for kind, payload, _ in _attrs(body[4:]):
                if kind == CTRL_ATTR_FAMILY_ID:
                    _family_ids[name] = struct.unpack_from("=H", payload)[0]
        if name not in _family_ids:
            raise NetlinkError(errno.ENOENT, f"no generic netlink family {name}")
    return _family_ids[name]


def flush_tcp_metrics() -> None:
    with _Socket(NETLINK_GENERIC) as genl:
        family = _genl_family(genl, "tcp_metrics")
        genl.request(family, NLM_F_ACK, struct.pack("=BBH", TCP_METRICS_CMD_DEL, 1, 0))


# --- netfilter --------------------------------------------------------------------------------


def _nfgen(family: int) -> bytes:
    return struct.pack("=BBH", family, 0, 0)


def nft_table_count() -> int:
    with _Socket(NETLINK_NETFILTER) as nfnl:
        return len(nfnl.request((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE, NLM_F_DUMP, _nfgen(socket.AF_UNSPEC)))


def flush_conntrack() -> None:
    """Every connection tracking entry of the netns."""
    with _Socket(NETLINK_NETFILTER) as nfnl:
        nfnl.request((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE, NLM_F_ACK, _nfgen(socket.AF_UNSPEC))


def _orig_ip(attrs: bytes, ip_attr: int) -> bytes | None:
    """An IPv4 address of an entry's original tuple (``ip_attr``: source or destination)."""
    for kind, tuple_payload, _ in _attrs(attrs):
        if kind == CTA_TUPLE_ORIG:
            for ip_kind, ip_payload, _ in _attrs(tuple_payload):
                if ip_kind == CTA_TUPLE_IP:
                    for addr_kind, address, _ in _attrs(ip_payload):
                        if addr_kind == ip_attr:
                            return address
    return None


def delete_conntrack_from(address: str) -> int:
    """Entries of the netns whose original source is ``address`` (what a sandbox started through
    the host; the kernel filters the dump, one walk of the table); how many were deleted."""
    packed = ipaddress.IPv4Address(address).packed
    tuple_attr = _attr(CTA_TUPLE_ORIG | NLA_F_NESTED, _attr(CTA_TUPLE_IP | NLA_F_NESTED, _attr(CTA_IP_V4_SRC, packed)))
    filter_attr = _attr(
        CTA_FILTER | NLA_F_NESTED, _attr(CTA_FILTER_ORIG_FLAGS, struct.pack("=I", CTA_FILTER_FLAG_CTA_IP_SRC))
    )
    deleted = 0
    with _Socket(NETLINK_NETFILTER) as nfnl:
        dump = nfnl.request(
            (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET,
            NLM_F_DUMP,
            _nfgen(socket.AF_INET) + tuple_attr + filter_attr,
        )
        for _, body in dump:
            if _orig_ip(body[4:], CTA_IP_V4_SRC) != packed:
                continue  # the filter is the kernel's; what is deleted is decided here
            keep = b"".join(whole for kind, _, whole in _attrs(body[4:]) if kind in (CTA_TUPLE_ORIG, CTA_ZONE))
            nfnl.request(
                (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE,
                NLM_F_ACK,
                _nfgen(socket.AF_INET) + keep,
                ignore=(errno.ENOENT,),
            )
            deleted += 1
    return deleted


# --- links, addresses, routes (rtnetlink) ------------------------------------------------------

_CREATE = NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL


def add_veth(name: str, peer: str, peer_netns_fd: int, macs: tuple[str, str] | None = None) -> None:
    """``ip link add NAME [address MAC] type veth peer name PEER [address MAC] netns NETNS``: the peer
    is made in that netns; ``macs`` (this end's, the peer's) or the kernel's random ones."""
    peer_info = _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + _attr(IFLA_IFNAME, peer.encode() + b"\0")
    peer_info += _attr(IFLA_NET_NS_FD, struct.pack("=I", peer_netns_fd))
    if macs is not None:
        peer_info += _attr(IFLA_ADDRESS, bytes.fromhex(macs[1].replace(":", "")))
    linkinfo = _attr(IFLA_INFO_KIND, b"veth") + _attr(
        IFLA_INFO_DATA | NLA_F_NESTED, _attr(VETH_INFO_PEER | NLA_F_NESTED, peer_info)
    )
    payload = _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + _attr(IFLA_IFNAME, name.encode() + b"\0")
    if macs is not None:
        payload += _attr(IFLA_ADDRESS, bytes.fromhex(macs[0].replace(":", "")))
    payload += _attr(IFLA_LINKINFO | NLA_F_NESTED, linkinfo)
    with _Socket(NETLINK_ROUTE) as rtnl:
        rtnl.request(RTM_NEWLINK, _CREATE, payload)


def add_address(link: str, address: str, prefixlen: int) -> None:
    """``ip addr add ADDRESS/PREFIXLEN dev LINK`` (a link of the calling thread's netns)."""
    packed = ipaddress.IPv4Address(address).packed
    payload = _IFADDR.pack(socket.AF_INET, prefixlen, 0, RT_SCOPE_UNIVERSE, socket.if_nametoindex(link))
    payload += _attr(IFA_LOCAL, packed) + _attr(IFA_ADDRESS, packed)
    with _Socket(NETLINK_ROUTE) as rtnl:
        rtnl.request(RTM_NEWADDR, _CREATE, payload)


def set_up(link: str) -> None:
    """``ip link set LINK up``."""
    with _Socket(NETLINK_ROUTE) as rtnl:
        rtnl.request(
            RTM_NEWLINK, NLM_F_ACK, _IFINFO.pack(socket.AF_UNSPEC, 0, socket.if_nametoindex(link), IFF_UP, IFF_UP)
        )


def add_default_route(gateway: str) -> None:
    """``ip route add default via GATEWAY``."""
    payload = _RTMSG.pack(socket.AF_INET, 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST, 0)
    payload += _attr(RTA_GATEWAY, ipaddress.IPv4Address(gateway).packed)
    with _Socket(NETLINK_ROUTE) as rtnl:
        rtnl.request(RTM_NEWROUTE, _CREATE, payload)
