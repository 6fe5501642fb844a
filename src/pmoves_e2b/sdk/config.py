"""The one place that configures the stock E2B SDKs (``e2b``, ``e2b_code_interpreter``).

Two modes, chosen from ``E2B_SANDBOX_URL``:

* **self-hosted** (default): our e2b-sandbox serves both the E2B control-plane API and the
  sandbox traffic, so ``api_url`` and ``sandbox_url`` are both ``E2B_SANDBOX_URL`` and the
  key is ``E2B_API_KEY``.
* **cloud**: ``E2B_SANDBOX_URL`` points at E2B's own API (a host under ``e2b.app`` or
  ``e2b.dev``, e.g. ``https://api.e2b.dev``). Then the SDK keeps its own endpoints: we only
  pass the key and the domain, and sandbox traffic goes to ``https://sandbox.<domain>``.

Everything that talks to sandboxes through the SDK gets its keyword arguments from
``sdk_config().options()``, so no other module decides where sandboxes live.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Literal, NoReturn
from urllib.parse import urlsplit

from pmoves_e2b.config import Settings, get_settings
from pmoves_e2b.sandbox.backends.base import ENVD_PORT

# Hosts E2B runs its public API on; a URL under one of them means "cloud mode".
CLOUD_DOMAINS = ("e2b.app", "e2b.dev")

Mode = Literal["self-hosted", "cloud"]


@dataclass(frozen=True)
class SdkConfig:
    mode: Mode
    api_key: str
    # Self-hosted: our e2b-sandbox. Cloud: None (the SDK derives https://api.<domain>).
    api_url: str | None
    sandbox_url: str | None
    # Cloud: the E2B domain (e2b.app / e2b.dev). Self-hosted: None.
    domain: str | None
    # Self-hosted: the domain (with TLS port) under which e2b-sandbox routes
    # ``{port}-{id}.<domain>`` hosts; what URLs handed to other programs must use.
    public_domain: str | None = None

    def options(self) -> dict[str, Any]:
        """Keyword arguments for every SDK call (create, connect, list, kill, set_timeout)."""
        opts: dict[str, Any] = {"api_key": self.api_key}
        if self.api_url:
            opts["api_url"] = self.api_url
        if self.sandbox_url:
            opts["sandbox_url"] = self.sandbox_url
        if self.domain:
            opts["domain"] = self.domain
        return opts

    def public_sandbox_url(self, sandbox_id: str, port: int = ENVD_PORT) -> str | None:
        """Base URL reaching a sandbox port without SDK headers (signed file URLs), self-hosted only.

        The SDK builds such URLs from ``sandbox_url``, which routes only with the
        ``E2b-Sandbox-Id`` header; a plain HTTP client needs the host-routed form.
        """
        if self.mode != "self-hosted" or not self.public_domain:
            return None
        return f"https://{port}-{sandbox_id}.{self.public_domain}"

    def port_websocket(
        self, sandbox_id: str, port: int, path: str, traffic_token: str | None = None
    ) -> tuple[str, dict[str, str]]:
        """WebSocket URL and headers that reach ``port`` of a sandbox through the sandbox proxy.

        Self-hosted: e2b-sandbox routes by the ``E2b-Sandbox-*`` headers; cloud: E2B's host pattern.
        """
        headers = {"e2b-traffic-access-token": traffic_token} if traffic_token else {}
        if self.mode == "self-hosted" and self.sandbox_url:
            base = "ws" + self.sandbox_url.removeprefix("http")
            return base + path, {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": str(port), **headers}
        return f"wss://{port}-{sandbox_id}.{self.domain}{path}", headers

    def port_http(self, sandbox_id: str, port: int, traffic_token: str | None = None) -> tuple[str, dict[str, str]]:
        """HTTP base URL and headers that reach ``port`` of a sandbox through the sandbox proxy."""
        url, headers = self.port_websocket(sandbox_id, port, "", traffic_token)
        return "http" + url.removeprefix("ws"), headers

    @property
    def health_url(self) -> str | None:
        """Where the sandbox backend answers ``GET /health`` (self-hosted only)."""
        return f"{self.api_url}/health" if self.mode == "self-hosted" and self.api_url else None


def cloud_domain(url: str) -> str | None:
    """The E2B domain if ``url`` is one of E2B's own hosts, else None."""
    host = (urlsplit(url).hostname or "").lower()
    for domain in CLOUD_DOMAINS:
        if host == domain or host.endswith("." + domain):
            return domain
    return None


def build_sdk_config(sandbox_url: str, api_key: str, public_domain: str | None = None) -> SdkConfig:
    base = sandbox_url.rstrip("/")
    domain = cloud_domain(base)
    if domain is None:
        return SdkConfig(
            "self-hosted", api_key, api_url=base, sandbox_url=base, domain=None, public_domain=public_domain
        )
    # The SDK reads E2B_SANDBOX_URL / E2B_API_URL from the environment whenever an option is
    # not passed; PMOVES sets E2B_SANDBOX_URL to the *API* URL in cloud mode, which the SDK
    # would misuse as the sandbox proxy. Drop them so the SDK's own cloud endpoints apply.
    os.environ.pop("E2B_SANDBOX_URL", None)
    os.environ.pop("E2B_API_URL", None)
    return SdkConfig("cloud", api_key, api_url=None, sandbox_url=None, domain=domain)


def sdk_config(settings: Settings | None = None) -> SdkConfig:
    """The SDK configuration from the service settings (E2B_SANDBOX_URL, E2B_API_KEY)."""
    settings = settings or get_settings()
    return build_sdk_config(
        settings.e2b_sandbox_url or "", settings.secret("E2B_API_KEY") or "", settings.public_domain
    )


def exit_without_finalizing(code: int) -> NoReturn:
    """End a short-lived process that used the async SDK, skipping interpreter finalization.

    The async SDK's Rust HTTP transport (pyqwest) can abort the interpreter (SIGABRT) when it
    finalizes right after a request; measured on e2b 2.63.0 in about 1 exit of 5. Output is
    flushed first, so nothing the user should see is lost.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
