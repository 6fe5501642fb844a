"""Templates in S3/MinIO (``E2B_TEMPLATE_STORE=s3://bucket/prefix``): the only module that speaks S3.

The templates dir stays the local cache. After a build, the layers it made are uploaded, then the
template's record (so a record in the bucket never points at a layer that is not there yet):

    <prefix>/layers/<layer id>.tar     the layer dir as GNU tar (numeric owners, modes, every xattr
                                       namespace, overlay whiteouts as the char devices they are)
    <prefix>/templates/<name>.json     the template's record (tags, builds)

A template whose record or layers are missing here is pulled before its sandbox starts: the record
is written atomically, each layer unpacked into ``layers/.pull-*`` and renamed into place, so a
layer dir that exists is whole (as the builder guarantees). Several hosts building the same
template's tags race last-writer-wins on the record.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .errors import TemplateBuildError
from .store import build_record, layers_dir, split_ref, template_record_path, write_record

log = logging.getLogger(__name__)

_TAR_OPTIONS = ("--xattrs", "--xattrs-include=*", "--numeric-owner")


class StoreConfigError(ValueError):
    """E2B_TEMPLATE_STORE (or its S3 settings) is not usable."""


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # "" or ending in "/"

    @classmethod
    def parse(cls, url: str) -> S3Location:
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise StoreConfigError(f"E2B_TEMPLATE_STORE {url!r}: use s3://bucket[/prefix]")
        prefix = parsed.path.strip("/")
        return cls(parsed.netloc, f"{prefix}/" if prefix else "")


class S3TemplateStore:
    def __init__(
        self,
        url: str,
        *,
        endpoint_url: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        region: str | None = None,
    ) -> None:
        import boto3  # only when S3 storage is configured
        from botocore.config import Config

        self.location = S3Location.parse(url)
        self.url = url
        self._client: Any = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url or None,
            aws_access_key_id=access_key_id or None,
            aws_secret_access_key=secret_access_key or None,
            region_name=region or "us-east-1",
            # MinIO and other S3-compatible servers: path-style addressing, bounded waits.
            config=Config(s3={"addressing_style": "path"}, connect_timeout=10, read_timeout=120),
        )

    @classmethod
    def from_settings(cls, settings: Any = None) -> S3TemplateStore | None:
        """The configured store, or None when E2B_TEMPLATE_STORE is unset (local directory only)."""
        if settings is None:
            from pmoves_e2b.config import get_settings

            settings = get_settings()
        url = settings.e2b_template_store
        if not url:
            return None
        secret = settings.e2b_s3_secret_access_key
        return cls(
            url,
            endpoint_url=settings.e2b_s3_endpoint_url,
            access_key_id=settings.e2b_s3_access_key_id,
            secret_access_key=secret.get_secret_value() if secret is not None else None,
            region=settings.e2b_s3_region,
        )

    def _key(self, *parts: str) -> str:
        return self.location.prefix + "/".join(parts)

    def _exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._client.head_object(Bucket=self.location.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    # ---- upload ----

    def push(self, templates_dir: Path, name: str, built_layers: Iterable[str]) -> None:
        """Upload ``built_layers`` (those this build made), then the record."""
        self.push_layers(templates_dir, built_layers)
        self.push_record(templates_dir, name)

    def push_layers(self, templates_dir: Path, layers: Iterable[str]) -> None:
        """Upload each layer not already in the bucket (a layer id names its content)."""
        for layer in layers:
            if not self._exists(self._key("layers", f"{layer}.tar")):
                self.push_layer(templates_dir, layer)

    def push_record(self, templates_dir: Path, name: str) -> None:
        body = template_record_path(templates_dir, name).read_bytes()
        self._client.put_object(Bucket=self.location.bucket, Key=self._key("templates", f"{name}.json"), Body=body)
        log.info("template record uploaded", extra={"template": name, "store": self.url})

    def push_layer(self, templates_dir: Path, layer: str) -> None:
        path = layers_dir(templates_dir) / layer
        tar = subprocess.Popen(
            ["tar", "-C", str(path), *_TAR_OPTIONS, "-cf", "-", "."],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        if tar.stdout is None or tar.stderr is None:  # for the type checker: both are pipes
            raise RuntimeError("tar without pipes")
        try:
            self._client.upload_fileobj(tar.stdout, self.location.bucket, self._key("layers", f"{layer}.tar"))
        finally:
            tar.stdout.close()
            errors = tar.stderr.read().decode(errors="replace")
            code = tar.wait()
        if code != 0:
            # The object may hold a truncated tar: remove it so no reader takes it for a layer.
            self._client.delete_object(Bucket=self.location.bucket, Key=self._key("layers", f"{layer}.tar"))
            raise TemplateBuildError(f"packing layer {layer} for {self.url} failed: {errors.strip()[-2000:]}")
        log.info("template layer uploaded", extra={"layer": layer, "store": self.url})

    def delete_record(self, name: str) -> None:
        """A deleted template's record (its layers stay: ids name content, other templates share them)."""
        self._client.delete_object(Bucket=self.location.bucket, Key=self._key("templates", f"{name}.json"))

    # ---- download ----

    def record_names(self) -> list[str]:
        """The templates whose records the bucket holds."""
        prefix = self._key("templates", "")
        names = []
        for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.location.bucket, Prefix=prefix):
            for item in page.get("Contents") or ():
                key = str(item["Key"])[len(prefix) :]
                if key.endswith(".json") and "/" not in key:
                    names.append(key.removesuffix(".json"))
        return sorted(names)

    def pull(self, templates_dir: Path, ref: str) -> bool:
        """Fetch template ``ref``'s record (when the bucket has one) and its layers missing here;
        False when the bucket does not know the template or tag."""
        try:
            name, tag = split_ref(ref)
        except ValueError:
            return False
        record = self._record(name)
        build = build_record(record, tag) if record is not None else None
        if record is None or build is None:
            return False
        for layer in build.get("layers") or ():
            if not (layers_dir(templates_dir) / layer).is_dir():
                self.pull_layer(templates_dir, str(layer))
        templates_dir.mkdir(parents=True, exist_ok=True)
        write_record(templates_dir, name, record)
        return True

    def pull_record(self, templates_dir: Path, name: str) -> bool:
        """Only the record of template ``name`` (alias lookups); its layers come at the first create."""
        record = self._record(name)
        if record is None:
            return False
        templates_dir.mkdir(parents=True, exist_ok=True)
        write_record(templates_dir, name, record)
        return True

    def _record(self, name: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            found = self._client.get_object(Bucket=self.location.bucket, Key=self._key("templates", f"{name}.json"))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        record: dict[str, Any] = json.loads(found["Body"].read())
        return record

    def pull_layer(self, templates_dir: Path, layer: str) -> None:
        root = layers_dir(templates_dir)
        root.mkdir(parents=True, exist_ok=True)
        final = root / layer
        tmp = Path(tempfile.mkdtemp(prefix=f".pull-{layer}-", dir=root))
        try:
            os.chmod(tmp, 0o755)  # noqa: S103 - tar sets the layer root's own mode; until then as the builder makes it
            obj = self._client.get_object(Bucket=self.location.bucket, Key=self._key("layers", f"{layer}.tar"))
            tar = subprocess.Popen(
                ["tar", "-C", str(tmp), *_TAR_OPTIONS, "--same-permissions", "--same-owner", "-xf", "-"],
                stdin=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            if tar.stdin is None or tar.stderr is None:
                raise RuntimeError("tar without pipes")
            try:
                for chunk in obj["Body"].iter_chunks(1 << 20):
                    tar.stdin.write(chunk)
            finally:
                tar.stdin.close()
                errors = tar.stderr.read().decode(errors="replace")
                code = tar.wait()
            if code != 0:
                raise TemplateBuildError(f"unpacking layer {layer} from {self.url} failed: {errors.strip()[-2000:]}")
            try:
                tmp.rename(final)
            except OSError:
                if not final.is_dir():  # else another pull of the same layer won: theirs is whole too
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        log.info("template layer downloaded", extra={"layer": layer, "store": self.url})
