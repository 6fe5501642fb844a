"""Templates stored in S3 (E2B_TEMPLATE_STORE): built with the stock SDK, the local cache wiped,
sandboxes created from what the bucket holds. The S3 server is moto's standalone server (PyPI,
runs on loopback, no internet), the same API MinIO speaks."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from compat.private_templates import private_templates_stack
from e2b import Sandbox, Template

pytestmark = pytest.mark.stack

KEY_ID, SECRET = "pmoves-test", "pmoves-test-secret"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture()
def s3_server() -> Iterator[str]:
    port = _free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url, timeout=2)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _bucket(url: str) -> Any:
    return boto3.client(
        "s3", endpoint_url=url, aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET, region_name="us-east-1"
    )


def _store_env(url: str, bucket: str, prefix: str) -> dict[str, str]:
    """A new bucket on the S3 server and the stack settings that keep templates in it."""
    _bucket(url).create_bucket(Bucket=bucket)
    return {
        "E2B_TEMPLATE_STORE": f"s3://{bucket}/{prefix}",
        "E2B_S3_ENDPOINT_URL": url,
        "E2B_S3_ACCESS_KEY_ID": KEY_ID,
        "E2B_S3_SECRET_ACCESS_KEY": SECRET,
    }


def test_a_template_built_with_s3_storage_starts_after_the_local_cache_is_wiped(
    stack_factory: Any, running_stack: Any, tmp_path: Path, s3_server: str
) -> None:
    s3 = _bucket(s3_server)
    env = _store_env(s3_server, "templates", "pmoves")
    name = f"t-{uuid.uuid4().hex[:8]}"
    marker = uuid.uuid4().hex
    with private_templates_stack(stack_factory, running_stack, tmp_path / "templates", **env) as (_, templates):
        template = (
            Template()
            .from_template("base")
            .run_cmd(f"echo {marker} > /home/user/marker.txt && chmod 640 /home/user/marker.txt")
            .run_cmd("mkdir -p /opt/x /opt/y && echo a > /opt/x/a && touch /opt/y/keep /opt/y/gone", user="root")
            # Deleting what a lower layer made: a whiteout and an opaque dir in this layer.
            .run_cmd("rm /opt/y/gone && rm -rf /opt/x && mkdir /opt/x && echo b > /opt/x/b", user="root")
        )
        logs: list[str] = []
        Template.build(template, name, on_build_logs=lambda e: logs.append(e.message))
        assert any("uploading 3 new layer(s)" in line for line in logs), logs

        record = json.loads((templates / f"{name}.json").read_text())
        own = [layer for layer in record["layers"] if layer.startswith("custom-")]
        assert len(own) == 3
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket="templates", Prefix="pmoves/")["Contents"]}
        assert keys == {f"pmoves/templates/{name}.json", *(f"pmoves/layers/{layer}.tar" for layer in own)}
        uploaded = json.loads(s3.get_object(Bucket="templates", Key=f"pmoves/templates/{name}.json")["Body"].read())
        assert uploaded["layers"] == record["layers"]

        # The local cache loses the template: its record and every layer it made.
        (templates / f"{name}.json").unlink()
        for layer in own:
            shutil.rmtree(templates / "layers" / layer)

        # The alias lookup (Template.exists) brings the record back; the layers come with the create.
        assert Template.exists(name) and not (templates / "layers" / own[0]).exists()
        assert not Template.exists(f"t-{uuid.uuid4().hex[:8]}")
        sandbox = Sandbox.create(template=name, timeout=60)
        try:
            assert sandbox.files.read("/home/user/marker.txt").strip() == marker
            listing = sandbox.commands.run(
                "stat -c '%U %a' /home/user/marker.txt; find /opt/x /opt/y -mindepth 1 | sort", user="root"
            ).stdout.split()
            assert listing == ["user", "640", "/opt/x/b", "/opt/y/keep"], listing
        finally:
            sandbox.kill()
        assert all((templates / "layers" / layer).is_dir() for layer in own)
        assert json.loads((templates / f"{name}.json").read_text())["layers"] == record["layers"]
        assert not list((templates / "layers").glob(".pull-*"))

        # A template the bucket does not know either: the usual 404.
        with pytest.raises(Exception, match="404"):
            Sandbox.create(template=f"t-{uuid.uuid4().hex[:8]}", timeout=30)


def test_templates_only_in_the_store_are_listed_and_deleted_there_too(
    stack_factory: Any, running_stack: Any, tmp_path: Path, s3_server: str
) -> None:
    import os

    s3 = _bucket(s3_server)
    env = _store_env(s3_server, "listed", "p")
    name = f"t-{uuid.uuid4().hex[:8]}"
    with private_templates_stack(stack_factory, running_stack, tmp_path / "templates", **env) as (_, templates):
        Template.build(Template().from_template("base").run_cmd("echo elsewhere > /home/user/e.txt"), name)
        url, key = os.environ["E2B_API_URL"], {"X-API-KEY": os.environ["E2B_API_KEY"]}
        # Built by another host: here only in the bucket.
        (templates / f"{name}.json").unlink()
        listed = httpx.get(f"{url}/templates", headers=key)
        assert listed.status_code == 200, listed.text
        shapes = {t["templateID"]: t for t in listed.json()}
        assert name in shapes and shapes[name]["aliases"] == [name] and "base" in shapes
        sandbox = Sandbox.create(template=name, timeout=60)
        try:
            assert sandbox.files.read("/home/user/e.txt") == "elsewhere\n"
        finally:
            sandbox.kill()

        # Deleted: from the bucket too, so neither the list nor an alias lookup brings it back.
        assert httpx.delete(f"{url}/templates/{name}", headers=key).status_code == 204
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket="listed", Prefix="p/templates/").get("Contents", [])}
        assert f"p/templates/{name}.json" not in keys
        assert name not in {t["templateID"] for t in httpx.get(f"{url}/templates", headers=key).json()}
        assert not Template.exists(name)
