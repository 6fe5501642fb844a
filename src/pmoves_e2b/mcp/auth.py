"""Authentication and Host/Origin protection of e2b-mcp-server.

Every route except health needs one of the two credentials PMOVES clients send:
``Authorization: Bearer <E2B_MCP_SERVER_TOKEN>`` (docs, Agent Zero's MCP ``headers``) or
``X-E2B-API-Key: <E2B_API_KEY>`` (PMOVES' Agent Zero wrapper). Anything else gets a 401 JSON
answer before any route runs.
"""

from __future__ import annotations

import hmac
import json
import re

from mcp.server.transport_security import TransportSecuritySettings
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

PUBLIC_PATHS = frozenset({"/healthz"})
# Always allowed: loopback under any port. More via E2B_MCP_ALLOWED_HOSTS.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
HAS_PORT = re.compile(r":(\d+|\*)$")
UNAUTHORIZED_BODY = json.dumps(
    {
        "error": "unauthorized",
        "detail": "send 'Authorization: Bearer <E2B_MCP_SERVER_TOKEN>' or 'X-E2B-API-Key: <E2B_API_KEY>'",
    }
).encode()


def _matches(given: str | None, expected: str | None) -> bool:
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def is_authorized(headers: Headers, server_token: str | None, api_key: str | None) -> bool:
    authorization = headers.get("authorization", "")
    scheme, _, bearer = authorization.partition(" ")
    # Evaluate both so the time taken does not reveal which credential was close.
    bearer_ok = _matches(bearer.strip(), server_token) if scheme.lower() == "bearer" else False
    key_ok = _matches(headers.get("x-e2b-api-key"), api_key)
    return bearer_ok or key_ok


class AuthMiddleware:
    """Pure ASGI, so streamed MCP responses pass through untouched."""

    def __init__(self, app: ASGIApp, server_token: str | None, api_key: str | None) -> None:
        self.app = app
        self.server_token = server_token
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        if is_authorized(Headers(scope=scope), self.server_token, self.api_key):
            await self.app(scope, receive, send)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"www-authenticate", b'Bearer realm="e2b-mcp-server"'),
                    (b"content-length", str(len(UNAUTHORIZED_BODY)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": UNAUTHORIZED_BODY})


def parse_allowed_hosts(value: str) -> list[str]:
    """``E2B_MCP_ALLOWED_HOSTS``: comma-separated ``host`` or ``host:port`` (``*`` port = any)."""
    return [item.strip() for item in value.split(",") if item.strip()]


def transport_security(extra_hosts: list[str]) -> TransportSecuritySettings:
    """The SDK's DNS-rebinding protection, kept on, with loopback plus the configured hosts."""
    hosts: list[str] = []
    for host in [*LOOPBACK_HOSTS, *extra_hosts]:
        # A bare host name may arrive with or without a port in the Host header.
        hosts.extend([host] if HAS_PORT.search(host) else [host, f"{host}:*"])
    origins = [f"{scheme}://{host}" for host in hosts for scheme in ("http", "https")]
    return TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins)
