"""The sandbox's envd access token guards code execution here too.

envd is the one holder of the token (set by the host through ``POST /init``, replaced when a pooled
sandbox is claimed), so a token is valid exactly when envd accepts it: this server asks envd
(``GET /envs`` with the token, through ``envvars.get_envd_envs``) and remembers a yes for a few seconds. No token is kept
here, only a digest of the last accepted one. Without an envd URL (the server run on a host for
tests) nothing is checked, as envd itself checks nothing before ``/init``.

What needs the token: ``POST /execute`` and ``POST /restored`` always (no header passes only while envd has no token,
as envd's own routes do). The context routes check it when the caller sends one (a wrong token is
refused): the stock ``e2b-code-interpreter`` SDK (2.11.5) sends none on them, and they run no code.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from .envvars import get_envd_envs

ACCESS_TOKEN_HEADER = b"x-access-token"
REMEMBER_SECONDS = 5.0
ALWAYS_GUARDED = frozenset({("POST", "/execute"), ("POST", "/restored")})
OPEN = frozenset({("GET", "/health")})


class EnvdTokenCheck:
    """Asks envd whether a token is its access token; caches the last yes briefly."""

    def __init__(self, envd_url: str) -> None:
        self.envd_url = envd_url.rstrip("/")
        self._accepted: tuple[bytes, float] | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.envd_url)

    async def accepts(self, token: str | None) -> bool | None:
        """True/False as envd answers (no token: whether envd has none set); None when envd
        cannot be asked."""
        if token is None:
            return await asyncio.to_thread(self._ask_envd, None)
        digest = hashlib.sha256(token.encode()).digest()
        if self._accepted is not None:
            known, until = self._accepted
            if time.monotonic() < until and hmac.compare_digest(known, digest):
                return True
        verdict = await asyncio.to_thread(self._ask_envd, token)
        if verdict:
            self._accepted = (digest, time.monotonic() + REMEMBER_SECONDS)
        return verdict

    def _ask_envd(self, token: str | None) -> bool | None:
        try:
            status, _ = get_envd_envs(self.envd_url, token)
        except OSError:
            return None
        if 200 <= status < 300:
            return True
        return False if status == 401 else None


class AccessTokenGuard:
    """ASGI middleware: 401 for a missing or wrong token where one is needed, 503 when envd
    cannot be asked (never open by failure)."""

    def __init__(self, app: ASGIApp, check: EnvdTokenCheck) -> None:
        self.app = app
        self.check = check

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.check.enabled or (scope["method"], scope["path"]) in OPEN:
            await self.app(scope, receive, send)
            return
        raw = dict(scope["headers"]).get(ACCESS_TOKEN_HEADER)
        if raw is None and (scope["method"], scope["path"]) not in ALWAYS_GUARDED:
            await self.app(scope, receive, send)
            return
        verdict = await self.check.accepts(raw.decode("latin-1") if raw is not None else None)
        if verdict is True:
            await self.app(scope, receive, send)
            return
        if verdict is None:
            response = JSONResponse(
                {"code": 503, "message": "cannot verify the access token: envd did not answer"}, 503
            )
        else:
            message = "invalid access token" if raw else "missing X-Access-Token header"
            response = JSONResponse({"code": 401, "message": message}, 401)
        await response(scope, receive, send)
