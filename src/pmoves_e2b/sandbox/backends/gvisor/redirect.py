"""Domain-based egress rules on gVisor: the redirect to the egress proxy, on the host's side.

Under ns, ``network.open_intercept`` redirects a sandbox's outbound TCP to ports 80/443 in its
netns's OUTPUT hook to a listener there (``sandbox/egress.py`` serves it). gVisor's netstack writes
its frames to the veth with a packet socket, past that hook: they meet netfilter first on the host,
entering from the host's end of the veth. So here the listener is a host socket on the veth's host
address, and

- table ``ip pmoves_e2b_redirect`` redirects, in prerouting, TCP to 80/443 arriving from a host
  veth to the port its map ``ports4`` (veth name -> port) holds (no element: no redirect);
- the input chain of ``inet pmoves_e2b`` drops whatever a sandbox sends to the host, so an
  exception is inserted before that drop (``ensure_tables``, again after that table is replaced):
  redirected connections (``ct status dnat``) to exactly one listener of that veth (set
  ``gvisor_redirects4``: veth . host address . port). A sandbox reaching its gateway's address
  directly is not redirected, and one sandbox cannot reach another's listener.
"""

from __future__ import annotations

import socket

from pmoves_e2b.sandbox.backends.ns import network
from pmoves_e2b.sandbox.backends.ns.network import HOST_VETH_PREFIX, INTERCEPT_PORTS, TABLE, SandboxNet

REDIRECT_TABLE = "pmoves_e2b_redirect"
REDIRECT_RULES_VERSION = "v1"
ACCEPT_SET = "gvisor_redirects4"
_PORTS = ", ".join(str(port) for port in INTERCEPT_PORTS)
REDIRECT_RULESET = f"""
table ip {REDIRECT_TABLE} {{
  chain {REDIRECT_RULES_VERSION} {{ }}
  map ports4 {{ type ifname : inet_service; }}
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname "{HOST_VETH_PREFIX}*" tcp dport {{ {_PORTS} }} redirect to : iifname map @ports4
  }}
}}
"""


def ensure_tables() -> None:
    """The redirect table and the input exception (each only when missing or outdated)."""
    network.ensure_table("ip", REDIRECT_TABLE, REDIRECT_RULES_VERSION, REDIRECT_RULESET)
    if f"@{ACCEPT_SET}" not in network.nft(f"list chain inet {TABLE} input"):
        network.nft(
            f"add set inet {TABLE} {ACCEPT_SET} {{ type ifname . ipv4_addr . inet_service; }}\n"
            f'insert rule inet {TABLE} input iifname "{HOST_VETH_PREFIX}*" ct status dnat '
            f"iifname . ip daddr . tcp dport @{ACCEPT_SET} accept\n"
        )


def open_redirect(net: SandboxNet) -> socket.socket:
    """A listening host socket that the sandbox's outbound TCP to 80/443 is redirected to."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind((net.host_address, 0))
        listener.listen(128)
        port = listener.getsockname()[1]
        close_redirect(net, None)  # a listener opened before (a restarted service): its port is unknown here
        network.nft(
            f'add element ip {REDIRECT_TABLE} ports4 {{ "{net.host_veth}" : {port} }}\n'
            f'add element inet {TABLE} {ACCEPT_SET} {{ "{net.host_veth}" . {net.host_address} . {port} }}\n'
        )
    except BaseException:
        listener.close()
        raise
    return listener


def close_redirect(net: SandboxNet, port: int | None) -> None:
    """Stop redirecting the sandbox (and, when ``port`` is known, accepting to its listener).
    Tolerates what is already gone."""
    try:
        network.nft(f'delete element ip {REDIRECT_TABLE} ports4 {{ "{net.host_veth}" }}\n')
    except network.NetworkError:
        pass  # not redirected
    if port is not None:
        element = f'inet {TABLE} {ACCEPT_SET} {{ "{net.host_veth}" . {net.host_address} . {port} }}'
        network.nft(f"add element {element}\ndelete element {element}\n")
    else:
        _forget_accepts(net)


def _forget_accepts(net: SandboxNet) -> None:
    listing = network.nft(f"list set inet {TABLE} {ACCEPT_SET}")
    if "elements = {" not in listing:
        return
    body = listing.split("elements = {", 1)[1].split("}", 1)[0]
    for item in (part.strip() for part in body.replace("\n", " ").split(",")):
        if item.startswith(f'"{net.host_veth}" '):
            network.nft(f"delete element inet {TABLE} {ACCEPT_SET} {{ {item} }}\n")
