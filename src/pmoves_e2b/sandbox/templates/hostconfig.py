"""The host's package-manager setup, handed to builds inside a template rootfs.

apt, pip and npm that work on the host often fail inside a fresh rootfs: the host may
reach the registries through a TLS-inspecting proxy (its CA is in the host trust store),
a local wheel cache, extra indexes or an apt mirror. A build therefore gets the host's
apt sources and options, pip config and ``PIP_*`` environment, npm config, CA
certificates and resolv.conf. Host paths named in the pip config (``/opt/wheels``,
``file:///opt/pypi/simple``) are bind-mounted read-only for the build only.
"""

from __future__ import annotations

import configparser
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
APT_CONF_DIR = Path("/etc/apt/apt.conf.d")
PIP_CONFIG_FILES = (
    Path("/etc/pip.conf"),
    Path("/etc/xdg/pip/pip.conf"),
    Path.home() / ".pip" / "pip.conf",
    Path.home() / ".config" / "pip" / "pip.conf",
)
NPM_CONFIG_FILES = (Path("/usr/etc/npmrc"), Path("/etc/npmrc"), Path.home() / ".npmrc")
CA_DIR = Path("/usr/local/share/ca-certificates")
RESOLV_CONF = Path("/etc/resolv.conf")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# Inside the rootfs, host paths named by the pip config appear under this prefix (on the build's tmpfs).
HOST_MOUNT_PREFIX = "/tmp/.pmoves-host"  # noqa: S108 - a path inside the build rootfs
# The build's copy of the host config, also on the tmpfs: nothing of it lands in a layer.
BUILD_CONFIG_DIR = "/tmp/.pmoves-build"  # noqa: S108 - a path inside the build rootfs


@dataclass(frozen=True)
class HostConfig:
    mirror: str
    apt_files: dict[str, bytes]  # rootfs path -> content (sources, option files)
    pip_conf: str  # merged pip config, host paths rewritten to HOST_MOUNT_PREFIX
    pip_env: dict[str, str]  # PIP_* variables, host paths rewritten
    npmrc: str
    ca_certs: dict[str, bytes]  # file name -> PEM
    resolv_conf: bytes
    host_paths: tuple[str, ...] = field(default=())  # bind-mounted read-only during builds

    def ca_fingerprint(self) -> str:
        """Changes when the trusted CAs change (the rootfs trust store must follow)."""
        digest = hashlib.sha256()
        for name in sorted(self.ca_certs):
            digest.update(name.encode() + b"\0" + self.ca_certs[name] + b"\0")
        return digest.hexdigest()


def read_host_config() -> HostConfig:
    host_paths: set[str] = set()
    pip_conf = _merged_pip_conf(host_paths)
    pip_env = {k: _rewrite_paths(v, host_paths) for k, v in os.environ.items() if k.startswith("PIP_")}
    return HostConfig(
        mirror=apt_mirror(),
        apt_files=_apt_files(),
        pip_conf=pip_conf,
        pip_env=pip_env,
        npmrc="".join(p.read_text() + "\n" for p in _unique_files(NPM_CONFIG_FILES)),
        ca_certs={p.name: p.read_bytes() for p in sorted(CA_DIR.glob("*.crt"))},
        resolv_conf=RESOLV_CONF.read_bytes() if RESOLV_CONF.exists() else b"",
        host_paths=tuple(sorted(host_paths)),
    )


def _unique_files(paths: tuple[Path, ...]) -> list[Path]:
    """Existing files, each once (``/usr/etc/npmrc`` is often a link to ``/etc/npmrc``)."""
    seen: dict[Path, Path] = {}
    for path in paths:
        if path.is_file():
            seen.setdefault(path.resolve(), path)
    return list(seen.values())


def apt_mirror() -> str:
    """The host's Debian mirror for bookworm main (deb822 or one-line format)."""
    for path in _source_files():
        text = path.read_text()
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = _deb822(stanza)
                suites = fields.get("suites", "").split()
                if (
                    "deb" in fields.get("types", "").split()
                    and "bookworm" in suites
                    and fields.get("enabled", "yes") != "no"
                ):
                    return fields["uris"].split()[0]
        else:
            for line in text.splitlines():
                parts = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
                if len(parts) >= 3 and parts[0] == "deb" and parts[2] == "bookworm":
                    return parts[1]
    return DEFAULT_MIRROR


def _source_files() -> list[Path]:
    files = [APT_SOURCES[0]] if APT_SOURCES[0].is_file() else []
    if APT_SOURCES[1].is_dir():
        files += sorted(p for p in APT_SOURCES[1].iterdir() if p.suffix in (".list", ".sources"))
    return files


def _deb822(stanza: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in stanza.splitlines():
        if line.startswith("#") or ":" not in line or line[:1].isspace():
            continue
        key, value = line.split(":", 1)
        fields[key.strip().lower()] = value.strip()
    return fields


def _apt_files() -> dict[str, bytes]:
    files = {str(p): p.read_bytes() for p in _source_files()}
    if APT_CONF_DIR.is_dir():
        for path in sorted(APT_CONF_DIR.iterdir()):
            text = path.read_bytes() if path.is_file() else b""
            # Option files only: hooks (Invoke) call host programs that the rootfs does not have.
            if text and b"Invoke" not in text and not path.name.startswith("docker-"):
                files[str(path)] = text
    return files


def _merged_pip_conf(host_paths: set[str]) -> str:
    merged = configparser.ConfigParser(interpolation=None)
    for path in PIP_CONFIG_FILES:
        if path.is_file():
            merged.read(path)
    lines: list[str] = []
    for section in merged.sections():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_rewrite_paths(value, host_paths)}" for key, value in merged.items(section)]
    return "\n".join(lines) + "\n"


def _rewrite_paths(value: str, host_paths: set[str]) -> str:
    """Point host-only paths (``/opt/wheels``, ``file:///opt/pypi/simple``) at their build bind mounts.

    Paths that exist in every rootfs too (the CA bundle) are kept as they are.
    """

    def rewrite(match: re.Match[str]) -> str:
        scheme, path = match.group(1) or "", match.group(2)
        top = "/".join(path.split("/")[:3])  # /opt/pypi, /etc/xdg
        if not Path(path).exists() or path.startswith(("/etc/ssl/", "/usr/")):
            return match.group(0)
        host_paths.add(top)
        return f"{scheme}{HOST_MOUNT_PREFIX}{path}"

    return re.sub(r"(file://)?(/[^\s,]+)", rewrite, value)
