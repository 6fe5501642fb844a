"""Access rules: the envd access token, signed /files URLs and the /init secret.

Once ``POST /init`` set an access token, every request needs ``X-Access-Token`` equal to it,
except ``GET /health``, ``POST /init`` (guarded by the host-only init secret instead) and
``GET|POST /files``, which accept the header or a URL signature (``download_url``/``upload_url``).
All comparisons are constant-time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

ACCESS_TOKEN_HEADER = "x-access-token"  # noqa: S105 - a header name, not a secret
INIT_SECRET_HEADER = "x-envd-init-secret"  # noqa: S105 - a header name, not a secret
TOKEN_EXEMPT = frozenset({("GET", "/health"), ("POST", "/init"), ("GET", "/files"), ("POST", "/files")})


def secrets_equal(expected: str, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())


def signature(path: str, operation: str, username: str, token: str, expiration: int | None) -> str:
    """``v1_`` + unpadded base64(sha256("path:operation:username:token[:expiration]"))."""
    parts = [path, operation, username, token] + ([str(expiration)] if expiration is not None else [])
    digest = hashlib.sha256(":".join(parts).encode()).digest()
    return "v1_" + base64.b64encode(digest).decode().rstrip("=")


def check_signed_request(
    token: str | None,
    header_token: str | None,
    query: dict[str, str],
    path: str,
    operation: str,
) -> str | None:
    """None when the /files request may proceed, else the reason it is refused."""
    if token is None:
        return None
    if header_token:
        return None if secrets_equal(token, header_token) else "access token present in header but does not match"
    given = query.get("signature")
    if not given:
        return "missing signature query parameter"
    raw_expiration = query.get("signature_expiration")
    expiration: int | None = None
    if raw_expiration:
        try:
            expiration = int(raw_expiration)
        except ValueError:
            return "invalid signature expiration"
    expected = signature(path, operation, query.get("username", ""), token, expiration)
    if not secrets_equal(expected, given):
        return "invalid signature"
    if expiration is not None and expiration < time.time():
        return "signature is already expired"
    return None
