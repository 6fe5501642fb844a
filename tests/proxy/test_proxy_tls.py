"""TLS listener material: host routing over https with our own CA, as the SDK uses it with E2B_DOMAIN."""

from __future__ import annotations

import os
import ssl
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from proxy.proxy_harness import KNOWN_ID, SandboxNetns, ServedApp, make_proxy

from pmoves_e2b.sandbox.tls import TlsFiles, ensure_tls

DOMAIN = "e2b.localhost:7443"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return ensure_tls(tmp_path_factory.mktemp("data") / "tls", DOMAIN)


@pytest.fixture(scope="module")
def tls_port(sandbox_netns: SandboxNetns, tls: TlsFiles) -> Iterator[int]:
    served = ServedApp(make_proxy(sandbox_netns.address, DOMAIN), ssl_certfile=str(tls.cert), ssl_keyfile=str(tls.key))
    yield served.port
    served.close()


def test_files_keys_private_and_idempotent(tls: TlsFiles) -> None:
    for key in (tls.key, tls.ca_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    before = {p: p.read_bytes() for p in (tls.ca_cert, tls.cert, tls.key, tls.bundle)}
    again = ensure_tls(tls.cert.parent, DOMAIN)
    assert {p: p.read_bytes() for p in (again.ca_cert, again.cert, again.key, again.bundle)} == before
    assert tls.bundle.read_bytes().endswith(tls.ca_cert.read_bytes())
    assert tls.bundle.stat().st_size > 10 * len(tls.ca_cert.read_bytes())  # system CAs are in it too


def test_certificate_names(tls: TlsFiles) -> None:
    cert = x509.load_pem_x509_certificate(tls.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = set(san.get_values_for_type(x509.DNSName))
    assert {"*.e2b.localhost", "e2b.localhost", "localhost"} <= names
    assert "*.localhost" not in names  # rustls rejects single-label wildcards
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} >= {"127.0.0.1"}


def test_new_domain_reissues_server_cert_keeps_ca(tmp_path: Path) -> None:
    first = ensure_tls(tmp_path / "tls", DOMAIN)
    ca, cert = first.ca_cert.read_bytes(), first.cert.read_bytes()
    second = ensure_tls(tmp_path / "tls", "sandboxes.example.test")
    assert second.ca_cert.read_bytes() == ca and second.cert.read_bytes() != cert
    names = (
        x509.load_pem_x509_certificate(second.cert.read_bytes())
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value.get_values_for_type(x509.DNSName)
    )
    assert "*.sandboxes.example.test" in names and "*.e2b.localhost" in names


def https_get(port: int, verify: ssl.SSLContext, sandbox_port: int, path: str) -> httpx.Response:
    """GET https://<port>-<id>.e2b.localhost:<port>/<path>, connecting to loopback (as *.localhost resolves)."""
    name = f"{sandbox_port}-{KNOWN_ID}.e2b.localhost"
    with httpx.Client(verify=verify, trust_env=False, timeout=10) as client:
        return client.get(
            f"https://127.0.0.1:{port}{path}", headers={"Host": f"{name}:{port}"}, extensions={"sni_hostname": name}
        )


def test_host_routing_over_tls_with_our_ca(tls: TlsFiles, tls_port: int) -> None:
    for cafile in (tls.ca_cert, tls.bundle):
        assert https_get(tls_port, ssl.create_default_context(cafile=str(cafile)), 49983, "/health").status_code == 204
    response = https_get(tls_port, ssl.create_default_context(cafile=str(tls.bundle)), 8080, "/headers")
    assert dict(response.json()["headers"])["host"] == f"8080-{KNOWN_ID}.e2b.localhost:{tls_port}"


def test_certificate_is_refused_without_our_ca(tls_port: int) -> None:
    with pytest.raises(httpx.ConnectError):
        https_get(tls_port, ssl.create_default_context(), 49983, "/health")


def test_the_sdk_transport_trusts_it_through_ssl_cert_file(tls: TlsFiles, tls_port: int) -> None:
    # The E2B SDK's own HTTP stack (rustls, its *.localhost resolution), configured only by
    # SSL_CERT_FILE, as a user sets it for E2B_DOMAIN=e2b.localhost:<tls port>.
    script = textwrap.dedent(
        f"""
        import httpx
        from e2b.api.client_sync import get_httpx_transport
        with httpx.Client(transport=get_httpx_transport(None)) as client:
            r = client.get("https://49983-{KNOWN_ID}.e2b.localhost:{tls_port}/health")
            print(r.status_code)
        """
    )
    env = {**os.environ, "SSL_CERT_FILE": str(tls.bundle)}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env.pop(name, None)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "204"


def test_concurrent_callers_agree_on_one_ca(tmp_path: Path) -> None:
    script = "import sys, pathlib; from pmoves_e2b.sandbox.tls import ensure_tls; ensure_tls(pathlib.Path(sys.argv[1]))"
    callers = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "tls")]) for _ in range(4)]
    assert all(caller.wait(timeout=60) == 0 for caller in callers)
    files = ensure_tls(tmp_path / "tls")
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    x509.load_pem_x509_certificate(files.cert.read_bytes()).verify_directly_issued_by(ca)
    assert files.bundle.read_bytes().endswith(files.ca_cert.read_bytes())
