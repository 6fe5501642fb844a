"""E2B snapshots: a sandbox's files, and where its tier can, its memory, kept as a template.

A snapshot is a template record in the templates dir: its layers are a new layer holding the
sandbox's file changes on top of the layers the sandbox ran on, and its ``snapshot`` entry says
where it came from. ``Sandbox.create(snapshot_id)`` makes sandboxes from it like from any template;
E2B's ``delete_snapshot`` is ``DELETE /templates/{id}`` (its layer then goes with
``pmoves-e2b template prune``).

Filesystem snapshots (the SDK's mode 'filesystem') work on every tier whose backend exports files;
their sandboxes boot fresh from the files. Snapshots with memory (the SDK's default, and forks)
need a tier that checkpoints; their sandboxes restore the memory image instead of booting.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pmoves_e2b.sandbox.errors import BadRequest, Conflict
from pmoves_e2b.sandbox.lifecycle import INIT_SECRET_FILE, CreateRequest, SandboxManager, new_sandbox_id
from pmoves_e2b.sandbox.templates.errors import TemplateNotFound
from pmoves_e2b.sandbox.templates.rootfs import remove_tree
from pmoves_e2b.sandbox.templates.store import TEMPLATE_NAME, layers_dir, read_record, referenced_layers, write_record
from pmoves_e2b.store.models import SandboxRow

UNNAMED_PREFIX = "snapshot-"
FORK_PREFIX = "fork-"
MAX_FORKS = 20


@dataclass(frozen=True)
class SnapshotInfo:
    snapshot_id: str
    names: list[str]
    sandbox_id: str
    created_at: str
    memory: bool

    @staticmethod
    def of(record: dict[str, Any]) -> SnapshotInfo:
        facts = record["snapshot"]
        return SnapshotInfo(record["name"], [record["name"]], facts["sandbox_id"], facts["created_at"], facts["memory"])


class Snapshots:
    def __init__(self, manager: SandboxManager, templates_dir: Path) -> None:
        self.manager = manager
        self.templates_dir = templates_dir

    async def take(self, sandbox_id: str, name: str | None, memory: bool, fork: bool = False) -> SnapshotInfo:
        """Snapshot a running or paused sandbox; a ``name`` that is a snapshot already gets the new one."""
        self.manager.get(sandbox_id)  # 404 before anything is written
        if name is not None:
            self._check_name(name)
        prefix = FORK_PREFIX if fork else UNNAMED_PREFIX
        snapshot_id = name or prefix + new_sandbox_id()[:16]
        suffix = secrets.token_hex(4)
        layers_root = layers_dir(self.templates_dir)
        layer_name = f"snapshot-{snapshot_id}-{suffix}"
        staging = layers_root / f".tmp-{layer_name}"
        image_dir = self.templates_dir / "snapshots" / f"{snapshot_id}-{suffix}" if memory else None
        if image_dir is not None:
            image_dir.parent.mkdir(mode=0o700, exist_ok=True)
            image_dir.mkdir(mode=0o700)
        try:
            image = await self.manager.capture(sandbox_id, staging, image_dir)
            foreign = [layer for layer in image.layers if Path(layer).parent != layers_root]
            if foreign:
                raise BadRequest(f"sandbox '{sandbox_id}' runs on layers outside {layers_root}: {', '.join(foreign)}")
            await asyncio.to_thread(staging.rename, layers_root / layer_name)
            if image_dir is not None:
                secret = image_dir / INIT_SECRET_FILE
                fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with open(fd, "w") as out:
                    out.write(image.init_secret)
        except BaseException:
            await asyncio.to_thread(_remove, staging, image_dir)
            raise
        created = datetime.now(UTC).isoformat(timespec="seconds")
        record = {
            **image.runtime,
            "name": snapshot_id,
            "layers": [layer_name, *(Path(layer).name for layer in image.layers)],
            "built_at": created,
            # A memory image restores only on the tier that took it; files boot on the source's.
            "isolation": image.tier if memory else image.runtime.get("isolation", ""),
            "restore_image": str(image_dir) if image_dir is not None else "",
            "snapshot": {
                "sandbox_id": sandbox_id,
                "template_id": image.template_id,
                "created_at": created,
                "memory": memory,
                "fork": fork,
            },
        }
        await asyncio.to_thread(write_record, self.templates_dir, snapshot_id, record)
        return SnapshotInfo.of(record)

    def _check_name(self, name: str) -> None:
        if not TEMPLATE_NAME.match(name):
            raise BadRequest(
                f"invalid snapshot name {name!r}: use lowercase letters, digits, '.', '_' and '-' (max 63)"
            )
        try:
            record = read_record(self.templates_dir, name)
        except TemplateNotFound:
            return
        if "snapshot" not in record:
            raise Conflict(f"'{name}' is a template, not a snapshot; choose another snapshot name")

    def listed(self, sandbox_id: str | None = None, name: str | None = None) -> list[SnapshotInfo]:
        """The snapshots (not the ones behind forks), oldest first."""
        found = []
        for path in sorted(self.templates_dir.glob("*.json")):
            try:
                record = read_record(self.templates_dir, path.stem)
            except TemplateNotFound:
                continue
            facts = record.get("snapshot")
            if not facts or facts.get("fork"):
                continue
            info = SnapshotInfo.of(record)
            if (sandbox_id is None or info.sandbox_id == sandbox_id) and (name is None or info.snapshot_id == name):
                found.append(info)
        found.sort(key=lambda info: (info.created_at, info.snapshot_id))
        return found

    async def fork(self, sandbox_id: str, count: int, timeout_s: int | None, api_key_id: str) -> list[Any]:
        """``count`` new sandboxes restored from one memory snapshot of a running sandbox: a
        ``SandboxRow`` for each that started, the exception for each that did not."""
        if not 1 <= count <= MAX_FORKS:
            raise BadRequest(f"count must be between 1 and {MAX_FORKS}")
        source = self.manager.get(sandbox_id)
        if source.state != "running":
            raise Conflict(f"sandbox '{sandbox_id}' is paused; resume it (connect) before forking it")
        info = await self.take(sandbox_id, None, memory=True, fork=True)
        network = self.manager.network(sandbox_id)
        results: list[SandboxRow | BaseException] = await asyncio.gather(
            *(
                self.manager.create(
                    CreateRequest(
                        template_id=info.snapshot_id,
                        timeout_s=timeout_s,
                        metadata=dict(source.metadata_ or {}),
                        env_vars=dict(source.env_vars or {}),
                        allow_internet=source.allow_internet,
                        auto_pause=source.auto_pause,
                        api_key_id=api_key_id,
                        network=network,
                    )
                )
                for _ in range(count)
            ),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, Exception):
                raise result  # cancelled: not a fork's own failure
        return results


def remove_snapshot_files(templates_dir: Path, record: dict[str, Any]) -> None:
    """The files of a deleted snapshot: its own layer (unless a snapshot taken of one of its
    sandboxes builds on it) and its memory image."""
    own = record["layers"][0]
    if own not in referenced_layers(templates_dir):
        remove_tree(layers_dir(templates_dir) / own)
    if record.get("restore_image"):
        remove_tree(Path(record["restore_image"]))


def _remove(layer: Path, image_dir: Path | None) -> None:
    remove_tree(layer)
    if image_dir is not None:
        remove_tree(image_dir)
