"""Template().from_image(...) from a real OCI registry on loopback (Debian's docker-registry, with
basic auth), into which the test pushed an image it made from our own base rootfs."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import httpx
import pytest
from compat.oci_registry import Registry, image_layout, push
from e2b import Sandbox, Template
from e2b.exceptions import BuildException

pytestmark = pytest.mark.stack


def test_from_image_pulls_from_a_registry_with_credentials(
    own_templates: Path, registry: Registry, tmp_path: Path
) -> None:
    base = json.loads((own_templates / "base.json").read_text())
    os_layer = (own_templates / "layers" / base["layers"][-1]).resolve()
    marker = uuid.uuid4().hex
    image_layout(os_layer, tmp_path / "oci", marker)
    image = f"{registry.address}/pmoves/test-image:v1"
    push(tmp_path / "oci", registry, "pmoves/test-image:v1")

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


def test_debian_bookworm_is_our_base(own_templates: Path) -> None:
    name = f"t-{uuid.uuid4().hex[:8]}"
    logs: list[str] = []
    template = Template().from_debian_image("bookworm").run_cmd("cat /etc/debian_version > /home/user/v.txt")
    Template.build(template, name, on_build_logs=lambda e: logs.append(e.message))
    assert not any("pulling" in line or "registry" in line for line in logs), logs  # no pull: our os layer
    sandbox = Sandbox.create(template=name, timeout=60)
    try:
        assert sandbox.files.read("/home/user/v.txt").startswith("12.")
    finally:
        sandbox.kill()
