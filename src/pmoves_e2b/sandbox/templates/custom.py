"""Custom templates built from E2B's build API (the stock SDK's ``Template().build``).

A build starts from a built template (``fromTemplate``) and runs its steps in order. Every RUN
step makes one layer (an overlay upper dir) whose id hashes the layer below, the step and the
ENV/WORKDIR/USER state it runs with: a step whose inputs did not change reuses its layer
("CACHED" in the log). The template record is replaced only when every step succeeded, so a
failed build leaves the previous build of that name working.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import shlex
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import TemplateBuildError, TemplateNotFound
from .hostconfig import HostConfig, read_host_config
from .rootfs import remove_tree, run_in_rootfs
from .store import layers_dir, read_record, write_record

STEP_TYPES = ("RUN", "ENV", "WORKDIR", "USER")
# Made by `pmoves-e2b template build`: not replaceable through the API.
BUILT_IN = frozenset({"base", "code-interpreter-v1", "desktop", "desktop-warm"})
LAYER_FORMAT = "custom-1"


class BuildRefused(ValueError):
    """A build request this server refuses as a whole (the API answers 400)."""


@dataclass
class BuildState:
    template_id: str
    build_id: str
    cpu_count: float
    memory_mb: int
    status: str = "waiting"  # waiting, building, ready, error
    entries: list[dict[str, Any]] = field(default_factory=list)
    reason: str = ""
    step: str = ""

    def log(self, message: str, level: str = "info") -> None:
        now = datetime.datetime.now(datetime.UTC).isoformat()
        self.entries.append({"timestamp": now, "level": level, "message": message})


@dataclass(frozen=True)
class Step:
    kind: str
    args: tuple[str, ...]
    force: bool


def parse_steps(raw: Any) -> list[Step]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise BuildRefused("steps must be a list")
    steps = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise BuildRefused(f"step {index + 1} must be an object")
        kind = item.get("type")
        args = item.get("args") or []
        if kind == "COPY":
            raise BuildRefused(f"step {index + 1}: COPY is not supported by this server yet")
        if kind not in STEP_TYPES:
            raise BuildRefused(f"step {index + 1}: unknown step type {kind!r} (supported: {', '.join(STEP_TYPES)})")
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise BuildRefused(f"step {index + 1}: args must be a list of strings")
        need = {"RUN": (1, 2), "WORKDIR": (1, 1), "USER": (1, 1)}.get(kind)
        if need and not need[0] <= len(args) <= need[1]:
            raise BuildRefused(f"step {index + 1}: {kind} takes {need[0]}..{need[1]} arguments, got {len(args)}")
        if kind == "ENV" and (len(args) % 2 or not args):
            raise BuildRefused(f"step {index + 1}: ENV takes name/value pairs")
        if kind == "WORKDIR" and not args[0].startswith("/"):
            raise BuildRefused(f"step {index + 1}: WORKDIR must be an absolute path")
        steps.append(Step(kind, tuple(args), bool(item.get("force"))))
    return steps


class CustomBuilds:
    """Build state by build id (in memory: a restarted service forgets builds in flight)."""

    def __init__(self, templates_dir: Path, host: HostConfig | None = None) -> None:
        self.templates_dir = templates_dir
        self._host = host
        self.builds: dict[str, BuildState] = {}
        self._lock = threading.Lock()  # one build at a time: they share the layers dir

    def request(self, name: str, cpu_count: float, memory_mb: int) -> BuildState:
        if name in BUILT_IN:
            raise BuildRefused(f"template '{name}' is built in; choose another name")
        state = BuildState(name, str(uuid.uuid4()), cpu_count, memory_mb)
        self.builds[state.build_id] = state
        return state

    def get(self, template_id: str, build_id: str) -> BuildState:
        state = self.builds.get(build_id)
        if state is None or state.template_id != template_id:
            raise KeyError(f"build '{build_id}' of template '{template_id}' not found")
        return state

    def start(self, state: BuildState, body: dict[str, Any]) -> None:
        """Validate the whole request first (nothing is written for a refused one), then build in a thread."""
        if state.status != "waiting":
            raise BuildRefused(f"build '{state.build_id}' was already started")
        for unsupported in ("fromImage", "fromImageRegistry", "readyCmd", "startCmd"):
            if body.get(unsupported):
                raise BuildRefused(f"{unsupported} is not supported by this server yet; use fromTemplate")
        parent = body.get("fromTemplate")
        if not isinstance(parent, str) or not parent:
            raise BuildRefused("fromTemplate is required (the template to build on, e.g. 'base')")
        try:
            parent_record = read_record(self.templates_dir, parent)
        except TemplateNotFound:
            raise BuildRefused(f"fromTemplate '{parent}' is not a built template") from None
        steps = parse_steps(body.get("steps"))
        state.status = "building"
        threading.Thread(
            target=self._run, args=(state, parent_record, steps, bool(body.get("force"))), daemon=True
        ).start()

    def _run(self, state: BuildState, parent: dict[str, Any], steps: list[Step], force: bool) -> None:
        try:
            with self._lock:
                self._build(state, parent, steps, force)
            state.status = "ready"
        except Exception as exc:  # noqa: BLE001 - the build's outcome goes to the SDK, a thread has no caller
            state.reason = str(exc)
            state.log(str(exc), "error")
            state.status = "error"

    def _build(self, state: BuildState, parent: dict[str, Any], steps: list[Step], force: bool) -> None:
        host = self._host or read_host_config()
        root = layers_dir(self.templates_dir)
        layers = list(parent["layers"])  # topmost first
        user, workdir = str(parent.get("user") or "user"), str(parent.get("workdir") or "/home/user")
        env: dict[str, str] = {}
        size = int(parent.get("size_bytes") or 0)
        for index, step in enumerate(steps, start=1):
            title = f"[{index}/{len(steps)}] {step.kind} {' '.join(step.args)}"
            state.step = str(index)
            if step.kind == "ENV":
                env.update(zip(step.args[0::2], step.args[1::2], strict=True))
            elif step.kind == "WORKDIR":
                workdir = step.args[0]
            elif step.kind == "USER":
                user = step.args[0]
            if step.kind != "RUN":
                state.log(title)
                continue
            run_as = step.args[1] if len(step.args) > 1 else user
            digest = hashlib.sha256(
                json.dumps([LAYER_FORMAT, layers[0], step.args[0], run_as, workdir, env]).encode()
            ).hexdigest()[:16]
            lid = f"custom-{digest}"
            final = root / lid
            if final.is_dir() and not (force or step.force):
                state.log(f"CACHED {title}")
                layers.insert(0, lid)
                continue
            state.log(title)
            size += self._run_layer(
                state, final, [root / layer for layer in layers], step.args[0], run_as, workdir, env, host
            )
            layers.insert(0, lid)
        write_record(
            self.templates_dir,
            state.template_id,
            {
                **{k: v for k, v in parent.items() if k not in ("layers", "name", "built_at", "size_bytes")},
                "name": state.template_id,
                "layers": layers,
                "user": user,
                "workdir": workdir,
                "memory_mb": state.memory_mb or parent.get("memory_mb", 0),
                "cpu_count": state.cpu_count or parent.get("cpu_count", 0),
                "built_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "size_bytes": size,
                "build_id": state.build_id,
            },
        )

    def _run_layer(
        self,
        state: BuildState,
        final: Path,
        lowers: list[Path],
        command: str,
        user: str,
        workdir: str,
        env: dict[str, str],
        host: HostConfig,
    ) -> int:
        tmp = final.with_name(f".tmp-{final.name}")
        remove_tree(tmp)
        tmp.mkdir(mode=0o755)
        log_path = final.with_name(f".{final.name}.log")
        q = shlex.quote
        # A new WORKDIR belongs to the user the step runs as (so it can write there).
        group = "root" if user == "root" else f'"$(id -gn {q(user)})"'
        script = f"[ -d {q(workdir)} ] || install -d -o {q(user)} -g {group} {q(workdir)}; cd {q(workdir)} && "
        if user == "root":
            script += command
        else:
            script += (
                f"exec runuser -u {q(user)} -- env HOME=$(getent passwd {q(user)} | cut -d: -f6) bash -c {q(command)}"
            )
        started = time.monotonic()
        try:
            with open(log_path, "w") as log:
                try:
                    run_in_rootfs(script, target=tmp, lowers=tuple(lowers), host=host, log=log, env=env)
                finally:
                    log.flush()
                    lines = log_path.read_text(errors="replace").splitlines()
                    # The log starts with the namespace script; its last line is the chroot.
                    start = next((i + 1 for i, line in enumerate(lines) if line.startswith("chroot ")), 0)
                    for line in lines[start:]:
                        state.log(line)
        except TemplateBuildError as exc:
            remove_tree(tmp)
            tail = "\n".join(e["message"] for e in state.entries[-10:])
            raise TemplateBuildError(f"step {state.step} failed: {exc}; last output:\n{tail}") from None
        except BaseException:
            remove_tree(tmp)
            raise
        finally:
            log_path.unlink(missing_ok=True)
        if final.exists():  # a forced rebuild: sandboxes may still run on the old one
            final.rename(final.with_name(f"{final.name}~replaced-{int(time.time())}"))
        tmp.rename(final)
        state.log(f"layer {final.name} built in {time.monotonic() - started:.1f} s")
        return sum(p.stat().st_size for p in final.rglob("*") if p.is_file() and not p.is_symlink())
