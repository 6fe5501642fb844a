"""E2B snapshots: a sandbox's files, and where its tier can, its memory, kept as a template.

A snapshot is a template record in the templates dir: its layers are a new layer holding the
sandbox's file changes on top of the layers the sandbox ran on, and its ``snapshot`` entry says
where it came from. ``Sandbox.create(snapshot_id)`` makes sandboxes from it like from any template;
E2B's ``delete_snapshot`` is ``DELETE /templates/{id}`` (its layer and memory image go with it).

Filesystem snapshots (the SDK's mode 'filesystem') work on every tier whose backend exports files;
their sandboxes boot fresh from the files. Snapshots with memory (the SDK's default, and forks)
need a tier that checkpoints; their sandboxes restore the memory image instead of booting.

A fork is a hidden memory snapshot (``fork-`` names, not listed) and sandboxes created from it.
No user deletes it, so ``Snapshots.collect`` does: once no sandbox lives on it (a fork that ended,
failed to start, or died while the stack was down; a paused fork still runs on its layer), its
record, memory image and layer go, the layer only when no other snapshot builds on it. It runs
after a fork, after each sandbox's teardown, and at the service's start (a crash mid-fork).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pmoves_e2b.sandbox.errors import BadRequest, Conflict
from pmoves_e2b.sandbox.lifecycle import INIT_SECRET_FILE, CreateRequest, SandboxManager, new_sandbox_id
from pmoves_e2b.sandbox.templates.errors import TemplateNotFound
from pmoves_e2b.sandbox.templates.rootfs import remove_tree
from pmoves_e2b.sandbox.templates.store import (
    TEMPLATE_NAME,
    layers_dir,
    layers_named_by,
    read_record,
    records_locked,
    referenced_layers,
    write_record,
)
from pmoves_e2b.store.models import SandboxRow

UNNAMED_PREFIX = "snapshot-"
FORK_PREFIX = "fork-"
MAX_FORKS = 20
# A snapshot's layer is "snapshot-<snapshot id>-<suffix>", staged as ".tmp-<that>"; its image "<id>-<suffix>".
FORK_LAYER = f"snapshot-{FORK_PREFIX}"
# A layer a snapshot copied in (see _adopt_foreign_layers) is "<its own layer>.<n>".
ADOPTED_SEPARATOR = "."

log = logging.getLogger(__name__)


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
        # Takes and forks in flight write files no record names yet: collect waits for none.
        self._busy = 0
        self._wanted = False  # a collect came while busy: the last one out runs it
        self._collecting = asyncio.Lock()
        manager.end_listeners.append(self._sandbox_ended)

    @contextlib.asynccontextmanager
    async def _writing(self, collect_after: bool = False) -> AsyncIterator[None]:
        async with self._collecting:
            self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1
            self._wanted = self._wanted or collect_after
            if not self._busy and self._wanted:
                await self.collect()

    async def _sandbox_ended(self, template_id: str) -> None:
        if template_id.startswith(FORK_PREFIX):
            await self.collect()

    async def collect(self) -> None:
        """Remove the hidden snapshots behind forks that no sandbox lives on any more (see the
        module's docstring), and what a crash left of one; errors are logged, never raised."""
        async with self._collecting:
            if self._busy:
                self._wanted = True
                return
            self._wanted = False
            templates, layers = self.manager.in_use()
            try:
                removed = await asyncio.to_thread(collect_forks, self.templates_dir, templates, layers)
            except Exception:
                log.exception("collecting the snapshots of ended forks failed")
                return
        if removed:
            log.info("removed what ended forks left", extra={"paths": removed})

    async def take(self, sandbox_id: str, name: str | None, memory: bool, fork: bool = False) -> SnapshotInfo:
        """Snapshot a running or paused sandbox; a ``name`` that is a snapshot already gets the new one."""
        self.manager.get(sandbox_id)  # 404 before anything is written
        async with self._writing():
            return await self._take(sandbox_id, name, memory, fork)

    async def _take(self, sandbox_id: str, name: str | None, memory: bool, fork: bool) -> SnapshotInfo:
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
        adopted: list[Path] = []
        try:
            image = await self.manager.capture(sandbox_id, staging, image_dir)
            below = await asyncio.to_thread(_adopt_foreign_layers, image.layers, layers_root, layer_name, adopted)
            await asyncio.to_thread(staging.rename, layers_root / layer_name)
            if image_dir is not None:
                secret = image_dir / INIT_SECRET_FILE
                fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with open(fd, "w") as out:
                    out.write(image.init_secret)
        except BaseException:
            await asyncio.to_thread(_remove, staging, image_dir, *adopted)
            raise
        created = datetime.now(UTC).isoformat(timespec="seconds")
        record = {
            **image.runtime,
            "name": snapshot_id,
            "layers": [layer_name, *below],
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
        if name.startswith(FORK_PREFIX):  # the hidden snapshots of forks, collected when they end
            raise BadRequest(f"invalid snapshot name {name!r}: names starting with '{FORK_PREFIX}' are reserved")
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
        # Collected after: the snapshot goes at once when none of its forks started.
        async with self._writing(collect_after=True):
            return await self._fork(sandbox_id, source, count, timeout_s, api_key_id)

    async def _fork(
        self, sandbox_id: str, source: SandboxRow, count: int, timeout_s: int | None, api_key_id: str
    ) -> list[Any]:
        info = await self._take(sandbox_id, None, memory=True, fork=True)
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
    sandboxes builds on it) and its memory image; and the layer of a fork's hidden snapshot it
    built on that nothing else names any more (that snapshot itself went with its last fork)."""
    referenced = referenced_layers(templates_dir)
    own, *below = record["layers"]
    for layer in [own, *(name for name in below if name.startswith((FORK_LAYER, own + ADOPTED_SEPARATOR)))]:
        if layer not in referenced:
            _remove_entry(layers_dir(templates_dir) / layer)
    if record.get("restore_image"):
        remove_tree(Path(record["restore_image"]))


def collect_forks(templates_dir: Path, used_templates: set[str], used_layers: set[str]) -> list[str]:
    """Remove the records of forks' hidden snapshots that no sandbox uses (``used_templates``:
    template ids of live sandboxes), then every fork layer (staged or not) that no record names and
    no sandbox runs on (``used_layers``: their layer dirs), and every fork memory image no record
    names. Only while no snapshot is being taken. Returns what went, relative to ``templates_dir``."""
    removed: list[str] = []
    with records_locked(templates_dir):
        for path in sorted(templates_dir.glob(f"{FORK_PREFIX}*.json")):
            try:
                record = read_record(templates_dir, path.stem)
            except TemplateNotFound:
                continue
            if (record.get("snapshot") or {}).get("fork") and record["name"] not in used_templates:
                path.unlink()
                removed.append(path.name)
        records = [json.loads(path.read_text()) for path in templates_dir.glob("*.json")]
    referenced = layers_named_by(records)
    images = {Path(record["restore_image"]).name for record in records if record.get("restore_image")}
    running_on = {Path(layer).name for layer in used_layers}
    layers_root = layers_dir(templates_dir)
    for path in sorted(layers_root.glob(f"*{FORK_LAYER}*")) if layers_root.is_dir() else []:
        name = path.name.removeprefix(".tmp-")
        if name.startswith(FORK_LAYER) and path.name not in referenced and path.name not in running_on:
            _remove_entry(path)
            removed.append(f"{layers_root.name}/{path.name}")
    images_root = templates_dir / "snapshots"
    for path in sorted(images_root.glob(f"{FORK_PREFIX}*")) if images_root.is_dir() else []:
        if path.name not in images:
            remove_tree(path)
            removed.append(f"{images_root.name}/{path.name}")
    return removed


def _remove_entry(path: Path) -> None:
    """A layer: a dir, or a link to one in another templates dir (``link_shared_templates``), whose
    target is that dir's to keep."""
    if path.is_symlink():
        path.unlink()
    else:
        remove_tree(path)


def _remove(layer: Path, image_dir: Path | None, *adopted: Path) -> None:
    for tree in (layer, *adopted):
        remove_tree(tree)
    if image_dir is not None:
        remove_tree(image_dir)


def _adopt_foreign_layers(
    layers: tuple[str, ...], layers_root: Path, layer_name: str, adopted: list[Path]
) -> list[str]:
    """The names, in the templates' layers dir, of the layers a sandbox runs on: a layer from
    elsewhere (what a pause to disk kept of its files, under the service's paused dir, which goes
    with the sandbox) is copied in as ``<layer_name>.<n>`` (hard links where it can: layers never
    change), appended to ``adopted`` as it is made, and goes when the snapshot is deleted."""
    names = []
    for number, layer in enumerate(layers, 1):
        path = Path(layer)
        if path.parent == layers_root:
            names.append(path.name)
            continue
        copy = layers_root / f"{layer_name}{ADOPTED_SEPARATOR}{number}"
        adopted.append(copy)
        same_file_system = path.stat().st_dev == layers_root.stat().st_dev
        argv = ["cp", "-a", *(["-l"] if same_file_system else []), "--", str(path), str(copy)]
        copied = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if copied.returncode != 0:
            raise OSError(f"could not copy layer {path} into {layers_root}: {copied.stderr.strip()[-500:]}")
        names.append(copy.name)
    return names
