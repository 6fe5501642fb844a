"""Local CA and wildcard server certificate for the TLS listener (host routing).

With ``E2B_DOMAIN=e2b.localhost:7443`` the stock SDK reaches envd at
``https://49983-<id>.e2b.localhost:7443`` (it resolves ``*.localhost`` to loopback itself) and
trusts the certificate through ``SSL_CERT_FILE=<tls dir>/bundle.pem``. rustls refuses a
single-label wildcard such as ``*.localhost``, hence ``*.e2b.localhost``.

Files in the TLS dir: ``ca.pem`` / ``ca-key.pem`` (the CA, 10 years), ``cert.pem`` / ``key.pem``
(the server certificate), ``bundle.pem`` (the system CAs plus ours). Keys are mode 0600.
``ensure_tls`` is idempotent: it keeps what is valid and re-issues only what is missing,
expiring within 30 days, or not covering the requested names.
"""

from __future__ import annotations

import datetime
import fcntl
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_DOMAIN = "e2b.localhost"
CA_DAYS = 3650
SERVER_DAYS = 825
RENEW_BEFORE = datetime.timedelta(days=30)
SYSTEM_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt")


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    ca_key: Path
    cert: Path  # server certificate (for uvicorn's ssl_certfile)
    key: Path  # server key (for uvicorn's ssl_keyfile)
    bundle: Path  # system CAs + ours: what clients put in SSL_CERT_FILE


def tls_files(tls_dir: Path) -> TlsFiles:
    return TlsFiles(
        ca_cert=tls_dir / "ca.pem",
        ca_key=tls_dir / "ca-key.pem",
        cert=tls_dir / "cert.pem",
        key=tls_dir / "key.pem",
        bundle=tls_dir / "bundle.pem",
    )


def server_names(domain: str) -> tuple[list[str], list[str]]:
    """(DNS names, IP addresses) the server certificate must cover for ``domain``."""
    host = domain.rsplit(":", 1)[0].strip().lower() if domain.count(":") == 1 else domain.strip().lower()
    if not host:
        raise ValueError(f"domain {domain!r} has no host name")
    dns = ["localhost", DEFAULT_DOMAIN, f"*.{DEFAULT_DOMAIN}"]
    ips = ["127.0.0.1", "::1"]
    if _is_ip(host):
        ips.append(host)
    else:
        dns.append(host)
        if "." in host:  # rustls rejects single-label wildcards
            dns.append(f"*.{host}")
    return sorted(set(dns)), sorted(set(ips))


def ensure_tls(tls_dir: Path, domain: str = DEFAULT_DOMAIN) -> TlsFiles:
    """Create (or keep) the CA, the server certificate for ``domain`` and the client bundle."""
    files = tls_files(tls_dir)
    dns, ips = server_names(domain)
    tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # `up` and the service may both get here at once: one makes the files, the other keeps them.
    with open(tls_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ca_key, ca_cert, ca_new = _ensure_ca(files)
        if ca_new or not _server_cert_ok(files, ca_cert, dns, ips):
            _issue_server_cert(files, ca_key, ca_cert, dns, ips)
        if ca_new or not _bundle_ok(files):
            _write_bundle(files)
    return files


def _ensure_ca(files: TlsFiles) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, bool]:
    try:
        cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
        key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
        usable = isinstance(key, ec.EllipticCurvePrivateKey) and key.public_key() == cert.public_key()
        if usable and _valid_for_long(cert):
            return key, cert, False  # type: ignore[return-value]
    except (OSError, ValueError):
        pass
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pmoves-e2b local CA")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(files.ca_key, _key_pem(key))
    files.ca_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, True


def _server_cert_ok(files: TlsFiles, ca_cert: x509.Certificate, dns: list[str], ips: list[str]) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
        cert.verify_directly_issued_by(ca_cert)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, TypeError, x509.ExtensionNotFound, InvalidSignature):
        return False
    have_dns = set(san.get_values_for_type(x509.DNSName))
    have_ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return (
        key.public_key() == cert.public_key()
        and _valid_for_long(cert)
        and set(dns) <= have_dns
        and set(ips) <= have_ips
    )


def _issue_server_cert(
    files: TlsFiles, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, dns: list[str], ips: list[str]
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    san = [x509.DNSName(name) for name in dns] + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(files.key, _key_pem(key))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _bundle_ok(files: TlsFiles) -> bool:
    try:
        return files.bundle.read_bytes().endswith(files.ca_cert.read_bytes())
    except OSError:
        return False


def _write_bundle(files: TlsFiles) -> None:
    system = b""
    for path in [ssl.get_default_verify_paths().cafile or "", *SYSTEM_BUNDLES]:
        if path and os.path.isfile(path):
            system = Path(path).read_bytes()
            break
    if not system:
        import certifi  # fallback when the OS has no bundle; installed with httpx

        system = Path(certifi.where()).read_bytes()
    tmp = files.bundle.with_suffix(".tmp")
    tmp.write_bytes(system.rstrip(b"\n") + b"\n" + files.ca_cert.read_bytes())
    tmp.replace(files.bundle)


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_private(path: Path, data: bytes) -> None:
    """Write a key so that it is never readable by others, not even briefly."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(tmp, 0o600)
    tmp.replace(path)


def _valid_for_long(cert: x509.Certificate) -> bool:
    now = _now()
    return cert.not_valid_before_utc <= now and cert.not_valid_after_utc - now > RENEW_BEFORE


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True
