"""client.py: self-hosted (our e2b-sandbox) vs cloud (E2B's own endpoints) SDK configuration."""

from __future__ import annotations

import pytest

from pmoves_e2b.sdk.config import build_sdk_config, cloud_domain


def test_self_hosted_uses_our_url_for_api_and_sandboxes() -> None:
    config = build_sdk_config("http://e2b-sandbox:7070/", "key")
    assert config.mode == "self-hosted"
    assert config.options() == {
        "api_key": "key",
        "api_url": "http://e2b-sandbox:7070",
        "sandbox_url": "http://e2b-sandbox:7070",
    }
    assert config.health_url == "http://e2b-sandbox:7070/health"
    assert config.public_sandbox_url("abc") is None  # no public domain configured


def test_self_hosted_public_urls_use_host_routing() -> None:
    config = build_sdk_config("http://localhost:7070", "key", public_domain="e2b.localhost:7443")
    assert config.public_sandbox_url("abc") == "https://49983-abc.e2b.localhost:7443"
    assert config.public_sandbox_url("abc", 8888) == "https://8888-abc.e2b.localhost:7443"


@pytest.mark.parametrize(
    "url,domain",
    [("https://api.e2b.dev", "e2b.dev"), ("https://api.e2b.app", "e2b.app"), ("https://e2b.app", "e2b.app")],
)
def test_cloud_mode_keeps_the_sdk_endpoints(monkeypatch: pytest.MonkeyPatch, url: str, domain: str) -> None:
    monkeypatch.setenv("E2B_SANDBOX_URL", url)  # PMOVES' cloud-mode value: the API URL
    config = build_sdk_config(url, "e2b_key")
    assert config.mode == "cloud"
    assert config.options() == {"api_key": "e2b_key", "domain": domain}
    assert config.public_sandbox_url("abc") is None  # the SDK's own URLs are public already
    # Left in the environment, the SDK would send sandbox traffic to the API host.
    import os

    assert "E2B_SANDBOX_URL" not in os.environ


@pytest.mark.parametrize("url", ["http://localhost:7070", "http://e2b.dev.example.com", "http://note2b.dev"])
def test_lookalike_hosts_are_self_hosted(url: str) -> None:
    assert cloud_domain(url) is None
