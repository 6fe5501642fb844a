"""What a template is made of: layers of build steps, content-addressed by their inputs."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from ..backends.base import TemplateRuntime
from .hostconfig import HostConfig
from .rootfs import run_host, run_in_rootfs

# Bump when the builder changes how layers are made, so that every layer is rebuilt.
LAYER_FORMAT = "1"


@dataclass
class BuildContext:
    """What a step sees: the layer dir being built and how to run commands for it."""

    target: Path
    lowers: tuple[Path, ...]
    host: HostConfig
    log: IO[str]

    def chroot(self, command: str, env: Mapping[str, str] | None = None) -> None:
        run_in_rootfs(command, target=self.target, lowers=self.lowers, host=self.host, log=self.log, env=env)

    def run(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        run_host(argv, self.log, env=env)


@dataclass(frozen=True)
class Step:
    title: str
    run: Callable[[BuildContext], None]
    # Everything the step's result depends on besides the layer inputs (commands, versions).
    fingerprint: str
    # Extra attempts after a failure: for steps that download from registries (apt, pip, npm),
    # which are idempotent when re-run on their own partial result.
    retries: int = 0


@dataclass(frozen=True)
class LayerSpec:
    name: str
    steps: tuple[Step, ...]
    # Layers (topmost first) mounted read-only below this one while it is built; its
    # content is then only the overlay upper dir. Empty: the layer is a tree of its own.
    build_on: tuple[str, ...] = ()
    # Extra inputs hashed into the layer id (source trees, the host CA certificates).
    inputs: Callable[[HostConfig], bytes] = field(default=lambda host: b"")


@dataclass(frozen=True)
class TemplateSpec(TemplateRuntime):
    """A template's definition: its layers (by name) and how its sandboxes run."""

    name: str
    layers: tuple[str, ...]  # topmost first
    # Bash run as root in the finished rootfs after a build; non-zero exit fails the build.
    check: str = ""


def layer_id(spec: LayerSpec, host: HostConfig, parent_ids: Sequence[str]) -> str:
    """``<name>-<hash>``: changes exactly when something the layer is built from changes."""
    digest = hashlib.sha256()
    for part in (LAYER_FORMAT, spec.name, *parent_ids):
        digest.update(part.encode() + b"\0")
    for step in spec.steps:
        digest.update(step.title.encode() + b"\0" + step.fingerprint.encode() + b"\0")
    digest.update(spec.inputs(host))
    return f"{spec.name}-{digest.hexdigest()[:16]}"


def tree_digest(root: Path) -> bytes:
    """Hash of the files under ``root`` (paths, modes and contents; caches excluded)."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if "__pycache__" in path.parts or path.suffix == ".pyc" or not path.is_file():
            continue
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(oct(path.stat().st_mode & 0o111).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.digest()
