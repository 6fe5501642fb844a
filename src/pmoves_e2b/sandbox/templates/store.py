"""Where built templates live, and the loader the control plane uses.

    <templates dir>/
      <template>.json         name, layer ids (topmost first), how its sandboxes run (TemplateRuntime);
                              custom templates also: "tags" (tag -> build id, when assigned) and
                              "builds" (build id -> that build's record, for every tagged build)
      layers/<name>-<hash>/   one read-only layer: a rootfs tree or an overlay upper dir
      layers/<name>-<hash>.json  how and when the layer was built (steps, seconds, bytes)
      logs/<name>-<hash>.log  build output
      .lock                   held while building

A layer directory appears (by rename) only once it is complete, so an existing layer
directory is always a whole one.

A template is referenced as ``name`` or ``name:tag`` (E2B's versions; ``name`` is
``name:default``, and a build id works as a tag). The record's top-level fields are the ``default``
tag's build (a built-in template's only build), so older readers see the default build.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..backends.base import TemplateImage
from .errors import TemplateNotFound

TEMPLATE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")  # also a file name: no "/" or ".."
TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEFAULT_TAG = "default"
# Fields of a build's record that are the template's, not the build's.
_TEMPLATE_FIELDS = ("tags", "builds")


def default_templates_dir() -> Path:
    """E2B_TEMPLATES_DIR from the settings (which also honour E2B_DATA_DIR)."""
    from pmoves_e2b.config import templates_dir

    return templates_dir()


def layers_dir(templates_dir: Path) -> Path:
    return templates_dir / "layers"


def put_layer_in_place(tmp: Path, final: Path) -> None:
    """Rename the finished layer ``tmp`` to ``final``. One already there (``--force``) is only set
    aside, under a name no template points at: sandboxes may still run on it (``template prune``)."""
    if final.exists():
        final.rename(final.with_name(f"{final.name}~replaced-{int(time.time())}"))
    tmp.rename(final)


def layer_bytes(layer: Path) -> int:
    """The bytes of a layer's files (symlinks not followed)."""
    return sum(p.stat().st_size for p in layer.rglob("*") if p.is_file() and not p.is_symlink())


def template_record_path(templates_dir: Path, name: str) -> Path:
    return templates_dir / f"{name}.json"


def read_record(templates_dir: Path, name: str) -> dict[str, Any]:
    if not TEMPLATE_NAME.match(name):
        raise TemplateNotFound(name, str(templates_dir))
    try:
        record: dict[str, Any] = json.loads(template_record_path(templates_dir, name).read_text())
    except (OSError, ValueError):
        raise TemplateNotFound(name, str(templates_dir)) from None
    return record


def write_record(templates_dir: Path, name: str, record: dict[str, Any]) -> None:
    """Atomically: a reader sees the old record or the new one, never half of one."""
    path = template_record_path(templates_dir, name)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def split_ref(ref: str) -> tuple[str, str]:
    """``name[:tag]`` -> (name, tag); ValueError naming what is wrong."""
    name, colon, tag = ref.partition(":")
    if not TEMPLATE_NAME.match(name):
        raise ValueError(f"invalid template name {name!r}: use lowercase letters, digits, '.', '_' and '-' (max 63)")
    if colon and not TAG.match(tag):
        raise ValueError(f"invalid tag {tag!r}: use letters, digits, '.', '_' and '-' (max 64), after one ':'")
    return name, tag or DEFAULT_TAG


def ref_of(name: str, tag: str) -> str:
    return name if tag == DEFAULT_TAG else f"{name}:{tag}"


def tags_of(record: dict[str, Any]) -> dict[str, dict[str, str]]:
    """tag -> {build_id, created_at}; a record without tags (built-in) has its one build as default."""
    tags: dict[str, dict[str, str]] | None = record.get("tags")
    if tags is not None:
        return tags
    build_id = str(record.get("build_id") or (record.get("layers") or [""])[0])
    return {DEFAULT_TAG: {"build_id": build_id, "created_at": str(record.get("built_at") or "")}}


def build_record(record: dict[str, Any], tag: str) -> dict[str, Any] | None:
    """The record of the build ``tag`` (or a build id) points at, or None."""
    if "tags" not in record:
        return record if tag == DEFAULT_TAG or tag == tags_of(record)[DEFAULT_TAG]["build_id"] else None
    builds: dict[str, dict[str, Any]] = record.get("builds") or {}
    entry = record["tags"].get(tag)
    return builds.get(entry["build_id"]) if entry else builds.get(tag)


def load_template(name: str, templates_dir: Path | str | None = None) -> TemplateImage:
    """The built template ``name`` (``name:tag``); :class:`TemplateNotFound` if unknown or incomplete."""
    root = Path(templates_dir) if templates_dir is not None else default_templates_dir()
    try:
        base, tag = split_ref(name)
    except ValueError:
        raise TemplateNotFound(name, str(root)) from None
    record = read_record(root, base)
    build = build_record(record, tag)
    if build is None and "tags" in record:  # a custom template without that tag
        tags = ", ".join(sorted(record["tags"])) or "none"
        raise TemplateNotFound(name, str(root), f"template '{base}' has no tag '{tag}' (its tags: {tags})")
    layers = tuple(str(layers_dir(root) / layer) for layer in (build or {}).get("layers") or ())
    if build is None or not layers or not all(Path(layer).is_dir() for layer in layers):
        raise TemplateNotFound(name, str(root))
    return TemplateImage(name=ref_of(base, tag), layers=layers, **TemplateImage.runtime_from_record(build))


@contextmanager
def records_locked(templates_dir: Path) -> Iterator[None]:
    """Serialises read-modify-write of records (tags) across processes; builds hold ``.lock``."""
    templates_dir.mkdir(parents=True, exist_ok=True)
    with open(templates_dir / ".records.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _store_tags(templates_dir: Path, name: str, record: dict[str, Any]) -> None:
    """Keep only tagged builds, mirror the default build at the top level, write atomically."""
    tags: dict[str, dict[str, str]] = record["tags"]
    live = {entry["build_id"] for entry in tags.values()}
    record["builds"] = {bid: build for bid, build in (record.get("builds") or {}).items() if bid in live}
    default = record["builds"].get(tags[DEFAULT_TAG]["build_id"]) if DEFAULT_TAG in tags else None
    top = {k: v for k, v in (default or {"layers": []}).items() if k not in _TEMPLATE_FIELDS}
    write_record(templates_dir, name, {**top, "name": name, "tags": tags, "builds": record["builds"]})


def assign_tags(templates_dir: Path, name: str, tags: Sequence[str], build: dict[str, Any]) -> None:
    """Point ``tags`` of template ``name`` at ``build`` (a build's record with its ``build_id``), at once."""
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    with records_locked(templates_dir):
        try:
            record = read_record(templates_dir, name)
        except TemplateNotFound:
            record = {"name": name, "tags": {}}
        record.setdefault("tags", {})
        record.setdefault("builds", {})[build["build_id"]] = build
        for tag in tags:
            record["tags"][tag] = {"build_id": build["build_id"], "created_at": now}
        _store_tags(templates_dir, name, record)


def remove_tags(templates_dir: Path, name: str, tags: Sequence[str]) -> None:
    """Remove ``tags`` (KeyError naming one that is not there: nothing changes). A template left
    without tags is removed; the layers stay for `pmoves-e2b template prune`."""
    with records_locked(templates_dir):
        record = read_record(templates_dir, name)
        missing = [tag for tag in tags if tag not in record.get("tags", {})]
        if missing:
            raise KeyError(f"template '{name}' has no tag '{missing[0]}'")
        for tag in tags:
            del record["tags"][tag]
        if record["tags"]:
            _store_tags(templates_dir, name, record)
        else:
            template_record_path(templates_dir, name).unlink()


def referenced_layers(templates_dir: Path) -> set[str]:
    """Every layer a template record points at, through any of its tags."""
    return layers_named_by(json.loads(path.read_text()) for path in templates_dir.glob("*.json"))


def layers_named_by(records: Iterable[dict[str, Any]]) -> set[str]:
    """The layers these records point at, through any of their tags."""
    layers: set[str] = set()
    for record in records:
        layers.update(record.get("layers") or ())
        for build in (record.get("builds") or {}).values():
            layers.update(build.get("layers") or ())
    return layers


def list_templates(templates_dir: Path | str | None = None) -> list[TemplateImage]:
    """Every complete built template, by name."""
    root = Path(templates_dir) if templates_dir is not None else default_templates_dir()
    images = []
    for path in sorted(root.glob("*.json")):
        try:
            images.append(load_template(path.stem, root))
        except TemplateNotFound:
            continue
    return images
