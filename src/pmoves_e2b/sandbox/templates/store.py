"""Where built templates live, and the loader the control plane uses.

    <templates dir>/
      <template>.json         name, layer ids (topmost first), how its sandboxes run (TemplateRuntime)
      layers/<name>-<hash>/   one read-only layer: a rootfs tree or an overlay upper dir
      layers/<name>-<hash>.json  how and when the layer was built (steps, seconds, bytes)
      logs/<name>-<hash>.log  build output
      .lock                   held while building

A layer directory appears (by rename) only once it is complete, so an existing layer
directory is always a whole one.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from ..backends.base import TemplateImage
from .errors import TemplateNotFound

TEMPLATE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")  # also a file name: no "/" or ".."


def default_templates_dir() -> Path:
    """E2B_TEMPLATES_DIR from the settings (which also honour E2B_DATA_DIR)."""
    from pmoves_e2b.config import templates_dir

    return templates_dir()


def layers_dir(templates_dir: Path) -> Path:
    return templates_dir / "layers"


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


def load_template(name: str, templates_dir: Path | str | None = None) -> TemplateImage:
    """The built template ``name``; :class:`TemplateNotFound` if it is unknown or incomplete."""
    root = Path(templates_dir) if templates_dir is not None else default_templates_dir()
    record = read_record(root, name)
    layers = tuple(str(layers_dir(root) / layer) for layer in record["layers"])
    if not layers or not all(Path(layer).is_dir() for layer in layers):
        raise TemplateNotFound(name, str(root))
    return TemplateImage(name=name, layers=layers, **TemplateImage.runtime_from_record(record))


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
