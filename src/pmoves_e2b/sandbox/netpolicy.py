"""A sandbox's network options (E2B's ``network`` field), validated. Pure data: no I/O here.

Outbound rules are IPv4 addresses, CIDR ranges (nftables) and domain names, ``*.`` wildcards
allowed (matched by the egress proxy against TLS SNI / HTTP Host on ports 80 and 443; sandboxes
have no IPv6); ``allowOut`` wins over ``denyOut`` and ``0.0.0.0/0`` in ``denyOut`` denies
everything not allowed. Inbound, a sandbox made
with ``allowPublicTraffic: false`` gets a traffic access token that the proxy requires on every
port, and ``maskRequestHost`` (``${PORT}`` expanded) becomes the Host header its servers see.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace
from typing import Any

ALL_TRAFFIC = "0.0.0.0/0"
MAX_RULES = 500
_DOMAIN = re.compile(r"^(\*\.)?([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
_HOST_MASK = re.compile(r"^[A-Za-z0-9.\-:_\[\]${}]{1,255}$")


class NetworkOptionError(ValueError):
    """A network option this server cannot honour; the message is shown to the SDK user."""


def parse_cidrs(field: str, values: list[str] | None) -> tuple[str, ...]:
    if not values:
        return ()
    if len(values) > MAX_RULES:
        raise NetworkOptionError(f"network.{field} has {len(values)} entries; at most {MAX_RULES} are allowed")
    found = []
    for value in values:
        text = value.strip().lower().rstrip(".") if isinstance(value, str) else ""
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            if ":" not in text and len(text) <= 253 and _DOMAIN.fullmatch(text) and not text.replace(".", "").isdigit():
                found.append(text)
                continue
            raise NetworkOptionError(
                f"network.{field}: {value!r} is not an IPv4 address, CIDR range or domain name"
            ) from None
        if net.version != 4:
            raise NetworkOptionError(f"network.{field}: {value!r} is IPv6; sandboxes have no IPv6 at all")
        found.append(str(net))
    return tuple(found)


def parse_dns_servers(values: list[str] | None) -> tuple[str, ...]:
    """E2B's dnsServers: up to 10 IPv4 addresses, all traffic to them allowed (when allowOut names a domain)."""
    if not values:
        return ()
    if len(values) > 10:
        raise NetworkOptionError("network.dnsServers takes at most 10 addresses")
    found = []
    for value in values:
        try:
            found.append(f"{ipaddress.IPv4Address(str(value).strip())}/32")
        except ValueError:
            raise NetworkOptionError(f"network.dnsServers: {value!r} is not an IPv4 address") from None
    return tuple(found)


def parse_ports(field: str, values: list[int] | None) -> tuple[int, ...]:
    if not values:
        return ()
    if len(values) > MAX_RULES or not all(isinstance(v, int) and 1 <= v <= 65535 for v in values):
        raise NetworkOptionError(f"network.{field} must be a list of port numbers (1-65535)")
    return tuple(sorted(set(values)))


def parse_host_mask(value: str | None) -> str | None:
    if value is None:
        return None
    if not _HOST_MASK.fullmatch(value) or "${" in value.replace("${PORT}", ""):
        raise NetworkOptionError(
            f"network.maskRequestHost {value!r} is not a host name (letters, digits, '.-:', and ${{PORT}})"
        )
    return value


def is_domain(entry: str) -> bool:
    return "/" not in entry  # parse_cidrs writes every address as a CIDR


def cidrs(entries: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(e for e in entries if not is_domain(e))


def domains(entries: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(e for e in entries if is_domain(e))


def domain_matches(pattern: str, host: str) -> bool:
    """``example.com`` matches itself; ``*.example.com`` matches its subdomains (not itself)."""
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return host == pattern


@dataclass(frozen=True)
class NetworkPolicy:
    allow_out: tuple[str, ...] = ()
    deny_out: tuple[str, ...] = ()
    allow_public_traffic: bool = True
    mask_request_host: str | None = None
    traffic_token: str | None = None  # set when allow_public_traffic is False
    https_ports: tuple[int, ...] = ()  # the proxy speaks TLS to the sandbox on these
    dns_servers: tuple[str, ...] = ()  # as /32 CIDRs

    def with_egress(
        self, allow_out: tuple[str, ...], deny_out: tuple[str, ...], dns_servers: tuple[str, ...] = ()
    ) -> NetworkPolicy:
        return replace(self, allow_out=allow_out, deny_out=deny_out, dns_servers=dns_servers)

    @property
    def allow_cidrs(self) -> tuple[str, ...]:
        """Allowed CIDRs, with the DNS servers when a domain is allowed (as E2B does)."""
        return cidrs(self.allow_out) + (self.dns_servers if domains(self.allow_out) else ())

    @property
    def has_domains(self) -> bool:
        return bool(domains(self.allow_out) or domains(self.deny_out))

    def decide(self, host: str | None, ip: str, never: list[ipaddress.IPv4Network], internet: bool) -> bool:
        """Egress proxy verdict for a connection to ``ip`` naming ``host`` (SNI / Host), E2B's order:
        never-reachable ranges, then allow (names, then CIDRs), then deny, then the internet switch."""
        address = ipaddress.IPv4Address(ip)
        if address.is_loopback or any(address in net for net in never):
            return False
        if host and any(domain_matches(d, host) for d in domains(self.allow_out)):
            return True
        if any(address in ipaddress.IPv4Network(c) for c in self.allow_cidrs):
            return True
        if host and any(domain_matches(d, host) for d in domains(self.deny_out)):
            return False
        if any(address in ipaddress.IPv4Network(c) for c in cidrs(self.deny_out)):
            return False
        return internet

    def host_header(self, port: int) -> str | None:
        return self.mask_request_host.replace("${PORT}", str(port)) if self.mask_request_host else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "allowOut": list(self.allow_out),
            "denyOut": list(self.deny_out),
            "allowPublicTraffic": self.allow_public_traffic,
            "maskRequestHost": self.mask_request_host,
            "trafficAccessToken": self.traffic_token,
            "httpsPorts": list(self.https_ports),
            "dnsServers": list(self.dns_servers),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> NetworkPolicy:
        if not data:
            return cls()
        return cls(
            allow_out=tuple(data.get("allowOut") or ()),
            deny_out=tuple(data.get("denyOut") or ()),
            allow_public_traffic=data.get("allowPublicTraffic", True) is not False,
            mask_request_host=data.get("maskRequestHost"),
            traffic_token=data.get("trafficAccessToken"),
            https_ports=tuple(data.get("httpsPorts") or ()),
            dns_servers=tuple(data.get("dnsServers") or ()),
        )

    def info(self) -> dict[str, Any]:
        """The ``network`` field of GET /sandboxes/{id} (never the token)."""
        shown: dict[str, Any] = {
            "allowOut": list(self.allow_out),
            "denyOut": list(self.deny_out),
            "allowPublicTraffic": self.allow_public_traffic,
        }
        if self.mask_request_host:
            shown["maskRequestHost"] = self.mask_request_host
        if self.https_ports:
            shown["httpsPorts"] = list(self.https_ports)
        if self.dns_servers:
            shown["dnsServers"] = [d.removesuffix("/32") for d in self.dns_servers]
        return shown
