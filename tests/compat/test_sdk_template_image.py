"""Template().from_image(...) from a real OCI registry on loopback (Debian's docker-registry, with
basic auth), into which the test pushed an image it made from our own base rootfs."""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import shutil
import subprocess
import tarfile
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from compat.private_templates import private_templates_stack
from e2b import Sandbox, Template
from e2b.exceptions import BuildException
from stack.harness import free_ports

pytestmark = pytest.mark.stack

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


@pytest.fixture()
def registry(tmp_path: Path) -> Iterator[Registry]:
    if shutil.which("docker-registry") is None or shutil.which("skopeo") is None or shutil.which("umoci") is None:
        pytest.skip("needs docker-registry, skopeo and umoci (apt-get install docker-registry skopeo umoci)")
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


def _image_layout(os_layer: Path, dest: Path, marker: str) -> None:
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
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes, media_type: str) -> dict[str, Any]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

    layer_bytes = layer.getvalue()
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


def _push(layout: Path, registry: Registry, image: str) -> None:
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


@pytest.fixture()
def own_templates(stack_factory: Any, running_stack: Any, tmp_path: Path) -> Iterator[Path]:
    with private_templates_stack(stack_factory, running_stack, tmp_path / "templates") as (_, templates):
        yield templates


def test_from_image_pulls_from_a_registry_with_credentials(
    own_templates: Path, registry: Registry, tmp_path: Path
) -> None:
    base = json.loads((own_templates / "base.json").read_text())
    os_layer = (own_templates / "layers" / base["layers"][-1]).resolve()
    marker = uuid.uuid4().hex
    _image_layout(os_layer, tmp_path / "oci", marker)
    image = f"{registry.address}/pmoves/test-image:v1"
    _push(tmp_path / "oci", registry, "pmoves/test-image:v1")

    name = f"t-{uuid.uuid4().hex[:8]}"
    template = (
        Template()
        .from_image(image, username=registry.username, password=registry.password)
        .run_cmd("cp /etc/test-image-marker /home/user/marker.txt")
    )
    logs: list[str] = []
    Template.build(template, name, on_build_logs=lambda e: logs.append(e.message))
    assert not any(registry.password in line for line in logs)
    sandbox = Sandbox.create(template=name, timeout=60)
    try:
        assert sandbox.files.read("/home/user/marker.txt").strip() == marker
        who = sandbox.commands.run("whoami; id -u; pwd; cat /etc/test-image-marker")
        assert who.stdout.split() == ["user", "1000", "/home/user", marker]
    finally:
        sandbox.kill()

    # Same digest: the image is not pulled again, and the step is cached.
    again: list[str] = []
    Template.build(template, name, on_build_logs=lambda e: again.append(e.message))
    assert any(line.startswith("CACHED FROM") for line in again), again
    assert any(line.startswith("CACHED [1/1]") for line in again), again

    # Wrong or missing credentials: the build fails with the registry's answer, the password never shown.
    wrong = "not-the-" + registry.password
    with pytest.raises(BuildException, match="(?i)unauthorized|authentication") as failed:
        Template.build(Template().from_image(image, username="pusher", password=wrong).run_cmd("true"), f"{name}-x")
    assert wrong not in str(failed.value)
    with pytest.raises(BuildException, match="(?i)unauthorized|authentication"):
        Template.build(Template().from_image(image).run_cmd("true"), f"{name}-y")
    assert not (own_templates / f"{name}-x.json").exists()


def test_bad_image_requests_are_refused_with_400(own_templates: Path) -> None:
    url, key = os.environ["E2B_API_URL"], {"X-API-KEY": os.environ["E2B_API_KEY"]}
    before = sorted(p.name for p in (own_templates / "layers").iterdir())
    for body, expected in (
        ({"fromImage": "UPPER/Case"}, "invalid image name"),
        ({"fromImage": "debian:12", "fromTemplate": "base"}, "not both"),
        ({"fromImage": "x/y:1", "fromImageRegistry": {"type": "aws", "awsAccessKeyId": "a"}}, "not supported"),
        ({"fromImage": "x/y:1", "fromImageRegistry": {"type": "registry", "username": "u"}}, "username and password"),
    ):
        requested = httpx.post(f"{url}/v3/templates", json={"name": f"t-{uuid.uuid4().hex[:8]}"}, headers=key)
        ids = requested.json()
        started = httpx.post(f"{url}/v2/templates/{ids['templateID']}/builds/{ids['buildID']}", json=body, headers=key)
        assert started.status_code == 400 and expected in started.json()["message"], (body, started.text)
    assert sorted(p.name for p in (own_templates / "layers").iterdir()) == before
