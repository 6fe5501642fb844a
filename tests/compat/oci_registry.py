"""A real OCI registry on loopback for template tests and benchmarks: Debian's docker-registry with
basic auth, and a test image made from our own os layer (trimmed, without `user`), pushed with skopeo."""

from __future__ import annotations

import hashlib
import io
import json
import secrets
import shutil
import subprocess
import tarfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from stack.harness import free_ports

# What the test image leaves out of the os layer (not needed to run envd; keeps the push small).
SKIPPED = (
    "usr/lib/x86_64-linux-gnu/libnode",
    "usr/lib/x86_64-linux-gnu/libicu",
    "usr/lib/x86_64-linux-gnu/perl",
    "usr/share/perl",
    "usr/lib/git-core",
    "usr/local/lib/node_modules",
    "usr/share/nodejs",
    "usr/share/doc",
    "usr/share/locale",
    "var/cache",
    "var/lib/apt/lists",
    "home/user",
)
ACCOUNTS = ("etc/passwd", "etc/group", "etc/shadow", "etc/gshadow")


@dataclass
class Registry:
    address: str
    username: str
    password: str


def tools_missing() -> bool:
    return any(shutil.which(tool) is None for tool in ("docker-registry", "skopeo", "umoci"))


@contextmanager
def running_registry(tmp_path: Path) -> Iterator[Registry]:
    """Debian's docker-registry on a free loopback port, basic auth with a fresh password."""
    password = secrets.token_urlsafe(12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # bcrypt through glibc/libxcrypt for the registry's htpasswd: no extra dependency

        hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH))  # noqa: S324 - this is bcrypt
    (tmp_path / "htpasswd").write_text(f"pusher:{hashed}\n")
    (port,) = free_ports(1)
    config = {
        "version": 0.1,
        "log": {"level": "error"},
        "storage": {"filesystem": {"rootdirectory": str(tmp_path / "registry")}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": secrets.token_hex(16)},
        "auth": {"htpasswd": {"realm": "pmoves-test", "path": str(tmp_path / "htpasswd")}},
    }
    (tmp_path / "registry.yml").write_text(json.dumps(config))  # YAML is a superset of JSON
    log = open(tmp_path / "registry.log", "w")
    server = subprocess.Popen(["docker-registry", "serve", str(tmp_path / "registry.yml")], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/").status_code == 401:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, (tmp_path / "registry.log").read_text()
            time.sleep(0.1)
        yield Registry(f"127.0.0.1:{port}", "pusher", password)
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()


def image_layout(os_layer: Path, dest: Path, marker: str) -> None:
    """An OCI image layout whose one (uncompressed) layer is the os layer, trimmed, without `user`."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:

        def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
            name = info.name.removeprefix("./")
            return None if name.startswith(SKIPPED) or name in ACCOUNTS else info

        tar.add(os_layer, arcname=".", filter=keep)
        for account in ACCOUNTS:  # the image has no `user`: the build must make one
            lines = (os_layer / account).read_bytes().splitlines(keepends=True)
            kept = b"".join(line for line in lines if not line.startswith(b"user:"))
            info = tarfile.TarInfo(account)
            info.size, info.mode = len(kept), (os_layer / account).stat().st_mode & 0o7777
            tar.addfile(info, io.BytesIO(kept))
        data = marker.encode() + b"\n"
        info = tarfile.TarInfo("etc/test-image-marker")
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))
    write_layout(layer.getvalue(), dest)


def rootfs_layout(rootfs: Path, dest: Path) -> None:
    """An OCI image layout whose one (uncompressed) layer is the directory ``rootfs`` as it is."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        for child in sorted(rootfs.iterdir()):
            tar.add(child, arcname=child.name)
    write_layout(layer.getvalue(), dest)


def busybox_rootfs(dest: Path) -> bool:
    """Debian's busybox-static (static: no libc, no python) as /bin with its applets; False without apt."""
    work = dest.parent / "busybox-deb"
    work.mkdir()
    fetched = subprocess.run(["apt-get", "download", "busybox-static"], cwd=work, capture_output=True, timeout=300)
    debs = list(work.glob("busybox-static_*.deb"))
    if fetched.returncode != 0 or not debs:
        return False
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(work / "x")], check=True, timeout=60)
    (dest / "bin").mkdir(parents=True)
    shutil.copy2(work / "x/bin/busybox", dest / "bin/busybox")
    applets = subprocess.run([str(dest / "bin/busybox"), "--list"], capture_output=True, text=True, check=True)
    for applet in applets.stdout.split():
        if applet != "busybox":
            (dest / "bin" / applet).symlink_to("busybox")
    return True


def write_layout(layer_bytes: bytes, dest: Path) -> None:
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes, media_type: str) -> dict[str, Any]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

    diff_id = f"sha256:{hashlib.sha256(layer_bytes).hexdigest()}"
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": blob(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json"),
        "layers": [blob(layer_bytes, "application/vnd.oci.image.layer.v1.tar")],
    }
    entry = blob(json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json")
    entry["annotations"] = {"org.opencontainers.image.ref.name": "v1"}
    (dest / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    (dest / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))


def push(layout: Path, registry: Registry, image: str) -> None:
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--dest-tls-verify=false",
            "--dest-creds",
            f"{registry.username}:{registry.password}",
            f"oci:{layout}:v1",
            f"docker://{registry.address}/{image}",
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
