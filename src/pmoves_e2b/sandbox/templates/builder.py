"""Build templates layer by layer, skipping every layer whose inputs did not change.

A layer is built into ``layers/.tmp-<id>`` and renamed to ``layers/<id>`` only when all of
its steps succeeded; builds hold an exclusive lock on the templates dir.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .definitions import LAYERS, TEMPLATES
from .errors import MissingHostTool, TemplateBuildError, TemplateNotFound
from .hostconfig import HostConfig, read_host_config
from .model import BuildContext, LayerSpec, Step, TemplateSpec, layer_id
from .rootfs import remove_tree, run_in_layers
from .store import layers_dir, load_template, put_layer_in_place, read_record, referenced_layers, write_record

if TYPE_CHECKING:
    from .s3store import S3TemplateStore

LOG_TAIL_LINES = 25


class BuildReporter(Protocol):
    def waiting_for_lock(self, path: Path) -> None: ...
    def layer_cached(self, layer: str, path: Path) -> None: ...
    def layer_started(self, layer: str, steps: Sequence[str]) -> None: ...
    def step_started(self, layer: str, index: int, title: str) -> None: ...
    def step_finished(self, layer: str, index: int, title: str, seconds: float) -> None: ...
    def layer_finished(self, layer: str, path: Path, seconds: float, size_bytes: int) -> None: ...


class SilentReporter:
    def waiting_for_lock(self, path: Path) -> None: ...
    def layer_cached(self, layer: str, path: Path) -> None: ...
    def layer_started(self, layer: str, steps: Sequence[str]) -> None: ...
    def step_started(self, layer: str, index: int, title: str) -> None: ...
    def step_finished(self, layer: str, index: int, title: str, seconds: float) -> None: ...
    def layer_finished(self, layer: str, path: Path, seconds: float, size_bytes: int) -> None: ...


@dataclass(frozen=True)
class LayerResult:
    layer_id: str
    path: Path
    built: bool  # False: it was already there
    seconds: float
    size_bytes: int


class TemplateBuilder:
    def __init__(
        self,
        templates_dir: Path,
        *,
        reporter: BuildReporter | None = None,
        layers: Mapping[str, LayerSpec] = LAYERS,
        templates: Mapping[str, TemplateSpec] = TEMPLATES,
        host: HostConfig | None = None,
        retry_delay: float = 5.0,
        remote: S3TemplateStore | None = None,
    ) -> None:
        self.remote = remote  # E2B_TEMPLATE_STORE: layers built here and the record go there too
        self.templates_dir = Path(templates_dir)
        self.reporter = reporter or SilentReporter()
        self.layers = layers
        self.templates = templates
        self.host = host or read_host_config()
        self.retry_delay = retry_delay
        self._ids: dict[str, str] = {}

    def layer_id(self, name: str) -> str:
        if name not in self._ids:
            spec = self.layers[name]
            self._ids[name] = layer_id(spec, self.host, [self.layer_id(p) for p in spec.build_on])
        return self._ids[name]

    def build_order(self, template: str) -> list[str]:
        """Layer names of ``template``, each after the layers it is built on."""
        order: list[str] = []

        def visit(name: str) -> None:
            for parent in self.layers[name].build_on:
                visit(parent)
            if name not in order:
                order.append(name)

        for name in reversed(self.spec(template).layers):
            visit(name)
        return order

    def spec(self, template: str) -> TemplateSpec:
        if template not in self.templates:
            raise TemplateNotFound(template, str(self.templates_dir))
        return self.templates[template]

    def build(self, template: str, *, force: bool = False) -> list[LayerResult]:
        """Build what is missing (or everything with ``force``) and record the template."""
        spec = self.spec(template)
        with self._lock():
            results = {name: self._ensure_layer(name, force) for name in self.build_order(template)}
            layer_ids = [self.layer_id(name) for name in spec.layers]
            if spec.check and (any(r.built for r in results.values()) or self._recorded_layers(template) != layer_ids):
                self._check(template, spec.check, [str(results[name].path) for name in spec.layers])
            write_record(
                self.templates_dir,
                template,
                {
                    "name": spec.name,
                    "layers": layer_ids,
                    **spec.runtime_record(),
                    "built_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                    "size_bytes": sum(results[name].size_bytes for name in spec.layers),
                },
            )
            if self.remote is not None:
                self.remote.push(self.templates_dir, template, [r.layer_id for r in results.values() if r.built])
        return [results[name] for name in self.build_order(template)]

    def check(self, template: str) -> None:
        """Run the template's check in its built rootfs, as recorded (TemplateNotFound, TemplateBuildError)."""
        spec = self.spec(template)
        if spec.check:
            self._check(template, spec.check, load_template(template, self.templates_dir).layers)

    def stale_layers(self, template: str, record_layers: Sequence[str]) -> list[str]:
        """Names of the template's layers whose inputs changed since ``record_layers`` were built."""
        return [name for name in self.spec(template).layers if self.layer_id(name) not in record_layers]

    def prune(self) -> list[Path]:
        """Delete layers no template record points at (older builds) and return them.

        Only safe while no sandbox still runs on such a layer: the control plane keeps no
        lock on layers, so run it when sandboxes of older builds are gone.
        """
        root = layers_dir(self.templates_dir)
        removed: list[Path] = []
        with self._lock():
            referenced = referenced_layers(self.templates_dir)
            for path in sorted(root.iterdir()) if root.is_dir() else []:
                if path.is_dir() and not path.name.startswith(".") and path.name not in referenced:
                    remove_tree(path)
                    path.with_name(f"{path.name}.json").unlink(missing_ok=True)
                    (self.templates_dir / "logs" / f"{path.name}.log").unlink(missing_ok=True)
                    removed.append(path)
        return removed

    # ---- internals ----

    def _recorded_layers(self, template: str) -> list[str]:
        try:
            return list(read_record(self.templates_dir, template)["layers"])
        except (TemplateNotFound, KeyError):
            return []

    def _run_step(self, step: Step, ctx: BuildContext, where: str, log_path: Path) -> None:
        for attempt in range(step.retries + 1):
            try:
                step.run(ctx)
                return
            except (TemplateBuildError, OSError) as exc:
                if attempt < step.retries and not isinstance(exc, MissingHostTool):
                    ctx.log.write(f"\n### {step.title}: failed ({exc}); retry {attempt + 1} of {step.retries}\n")
                    ctx.log.flush()
                    time.sleep(self.retry_delay * (attempt + 1))
                    continue
                raise TemplateBuildError(
                    f"{where}: step '{step.title}' failed: {exc}\n--- last lines of {log_path} ---\n{_tail(log_path)}"
                ) from exc

    def _check(self, template: str, command: str, layers: Sequence[str]) -> None:
        result = run_in_layers(command, layers)
        if result.returncode != 0:
            raise TemplateBuildError(
                f"template {template}: the built rootfs fails its check (exit {result.returncode}):\n"
                f"{command}\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
            )

    @contextmanager
    def _lock(self) -> Iterator[None]:
        self.templates_dir.mkdir(parents=True, exist_ok=True)
        path = self.templates_dir / ".lock"
        with open(path, "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.reporter.waiting_for_lock(path)
                fcntl.flock(lock, fcntl.LOCK_EX)
            self._remove_leftovers()
            yield

    def _remove_leftovers(self) -> None:
        """Half-built layers of an interrupted build (never anything still mounted)."""
        root = layers_dir(self.templates_dir)
        if root.is_dir():
            for path in root.iterdir():
                if path.name.startswith(".tmp-"):
                    remove_tree(path)

    def _ensure_layer(self, name: str, force: bool) -> LayerResult:
        lid = self.layer_id(name)
        final = layers_dir(self.templates_dir) / lid
        meta_path = final.with_name(f"{lid}.json")
        if final.is_dir() and not force:
            self.reporter.layer_cached(name, final)
            meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
            return LayerResult(lid, final, False, 0.0, int(meta.get("size_bytes", 0)))
        spec = self.layers[name]
        tmp = final.with_name(f".tmp-{lid}")
        tmp.mkdir(parents=True, mode=0o755)
        tmp.chmod(0o755)
        log_path = self.templates_dir / "logs" / f"{lid}.log"
        log_path.parent.mkdir(exist_ok=True)
        lowers = tuple(layers_dir(self.templates_dir) / self.layer_id(p) for p in spec.build_on)
        self.reporter.layer_started(name, [step.title for step in spec.steps])
        started = time.monotonic()
        step_seconds: dict[str, float] = {}
        try:
            with open(log_path, "w") as log:
                ctx = BuildContext(target=tmp, lowers=lowers, host=self.host, log=log)
                for index, step in enumerate(spec.steps):
                    self.reporter.step_started(name, index, step.title)
                    log.write(f"\n### {step.title}\n")
                    log.flush()
                    step_started = time.monotonic()
                    self._run_step(step, ctx, f"layer {name}", log_path)
                    step_seconds[step.title] = round(time.monotonic() - step_started, 1)
                    self.reporter.step_finished(name, index, step.title, step_seconds[step.title])
        except BaseException:
            remove_tree(tmp)
            raise
        seconds = time.monotonic() - started
        size = _disk_usage(tmp)
        meta_path.write_text(
            json.dumps(
                {
                    "layer": name,
                    "id": lid,
                    "seconds": round(seconds, 1),
                    "size_bytes": size,
                    "steps": step_seconds,
                    "built_on": [self.layer_id(p) for p in spec.build_on],
                },
                indent=1,
            )
            + "\n"
        )
        put_layer_in_place(tmp, final)
        self.reporter.layer_finished(name, final, seconds, size)
        return LayerResult(lid, final, True, seconds, size)


def _disk_usage(path: Path) -> int:
    out = subprocess.run(["du", "-sx", "-B1", str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def _tail(path: Path) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
    except OSError:
        return ""
