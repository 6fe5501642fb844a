"""OCI images from a registry as a template's bottom layer: skopeo pulls, umoci unpacks.

The only module that runs skopeo and umoci. An image is named as Docker names it
(``ubuntu:22.04`` is ``docker.io/library/ubuntu:22.04``); its layer is keyed by the manifest
digest the registry answers, so a moved tag is pulled anew and an unchanged one is not.
Registries on loopback are spoken to without TLS verification (a local ``docker-registry``
serves plain HTTP); every other registry needs valid TLS. Credentials go to skopeo in a
private auth file, never on a command line (``ps`` shows those) nor in a log.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import MissingHostTool, TemplateBuildError

INSPECT_TIMEOUT_S = 120
PULL_TIMEOUT_S = 1800
# Docker's reference grammar, simplified: [host[:port]/]path[:tag][@sha256:hex]
_REFERENCE = re.compile(
    r"^(?:(?P<host>[a-zA-Z0-9.-]+(?::[0-9]+)?|\[[0-9a-fA-F:]+\](?::[0-9]+)?)/)?"
    r"(?P<path>[a-z0-9]+(?:[._-]+[a-z0-9]+)*(?:/[a-z0-9]+(?:[._-]+[a-z0-9]+)*)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9._-]{0,127}))?"
    r"(?:@(?P<digest>sha256:[0-9a-f]{64}))?$"
)

_MESSAGE = re.compile(r'msg="(.*)"\s*$')


@dataclass(frozen=True)
class ImageRef:
    registry: str  # host[:port]
    path: str
    tag: str
    digest: str = ""

    @property
    def transport(self) -> str:
        """skopeo's source name."""
        ref = f"{self.registry}/{self.path}"
        return f"docker://{ref}@{self.digest}" if self.digest else f"docker://{ref}:{self.tag}"

    @property
    def loopback(self) -> bool:
        host = self.registry.rsplit(":", 1)[0] if not self.registry.startswith("[") else self.registry[1:].split("]")[0]
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def __repr__(self) -> str:  # never in a log or traceback
        return f"Credentials(username={self.username!r}, password=***)"


def parse_image(name: str) -> ImageRef:
    """Docker's naming; ValueError with the reason."""
    match = _REFERENCE.match(name) if len(name) <= 255 else None
    if match is None:
        raise ValueError(f"invalid image name {name!r}: expected [registry/]repository[:tag][@sha256:digest]")
    host, path = match["host"], match["path"]
    if host is not None and "." not in host and ":" not in host and host != "localhost":
        host, path = None, f"{host}/{path}"  # "library/ubuntu": a Docker Hub path, not a host
    if host is None:
        host = "docker.io"
        if "/" not in path:
            path = f"library/{path}"
    return ImageRef(host, path, match["tag"] or "latest", match["digest"] or "")


def _skopeo(args: list[str], image: ImageRef, creds: Credentials | None, timeout: float) -> str:
    if shutil.which("skopeo") is None:
        raise MissingHostTool("skopeo is not installed (apt-get install skopeo): needed for images from registries")
    with tempfile.TemporaryDirectory(prefix="pmoves-auth-") as scratch:  # 0700
        authfile = Path(scratch) / "auth.json"
        token = base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode() if creds else ""
        authfile.write_text(json.dumps({"auths": {image.registry: {"auth": token}} if creds else {}}))
        authfile.chmod(0o600)
        src = "--src-" if args[0] == "copy" else "--"
        tls = [f"{src}tls-verify=false"] if image.loopback else []
        argv = ["skopeo", "--command-timeout", f"{int(timeout)}s", "--override-os", "linux", "--override-arch", "amd64"]
        argv += [args[0], f"{src}authfile", str(authfile), *tls, *args[1:]]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise TemplateBuildError(
                f"skopeo {args[0]} of {image.transport} took longer than {timeout:.0f} s"
            ) from None
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        if said := _MESSAGE.search(reason):  # skopeo's log line: keep its message
            reason = said[1].replace('\\"', '"')
        if creds:
            reason = reason.replace(creds.password, "***")
        raise TemplateBuildError(f"cannot {args[0]} image {image.transport.removeprefix('docker://')}: {reason}")
    return done.stdout


def image_digest(image: ImageRef, creds: Credentials | None) -> str:
    """The manifest digest the registry answers for the image now."""
    if image.digest:
        return image.digest
    out = _skopeo(["inspect", "--format", "{{.Digest}}", image.transport], image, creds, INSPECT_TIMEOUT_S)
    return out.strip()


def pull_rootfs(image: ImageRef, creds: Credentials | None, target: Path) -> None:
    """Pull the image (linux/amd64) and unpack its root filesystem into ``target`` (a new dir)."""
    if shutil.which("umoci") is None:
        raise MissingHostTool("umoci is not installed (apt-get install umoci): needed to unpack images")
    with tempfile.TemporaryDirectory(prefix="pmoves-image-", dir=target.parent) as scratch:
        layout = Path(scratch) / "oci"
        _skopeo(
            ["copy", image.transport, f"oci:{layout}:image"],
            image,
            creds,
            PULL_TIMEOUT_S,
        )
        try:
            done = subprocess.run(
                ["umoci", "raw", "unpack", "--image", f"{layout}:image", str(target)],
                capture_output=True,
                text=True,
                timeout=PULL_TIMEOUT_S,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            raise TemplateBuildError(f"umoci took longer than {PULL_TIMEOUT_S} s to unpack the image") from None
        if done.returncode != 0:
            reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise TemplateBuildError(f"cannot unpack image {image.transport.removeprefix('docker://')}: {reason}")
