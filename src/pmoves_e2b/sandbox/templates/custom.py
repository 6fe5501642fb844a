"""Custom templates built from E2B's build API (the stock SDK's ``Template().build``).

A build starts from a built template (``fromTemplate``) and runs its steps in order. Every RUN
step makes one layer (an overlay upper dir) whose id hashes the layer below, the step and the
ENV/WORKDIR/USER state it runs with: a step whose inputs did not change reuses its layer
("CACHED" in the log). The build's tags (``name:tag``, else ``default``) are moved to it only
when every step succeeded, so a failed build leaves the previous build of that name working.
A build's state goes to a ``BuildJournal`` (the database) so its status outlives the process.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import re
import shlex
import stat
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .definitions import TEMPLATES
from .errors import TemplateBuildError, TemplateNotFound
from .hostconfig import HOST_MOUNT_PREFIX, HostConfig, read_host_config
from .images import Credentials, ImageRef, image_digest, parse_image, pull_rootfs
from .imagesetup import SETUP_FORMAT, set_up_image
from .rootfs import remove_tree, run_in_rootfs
from .runtime import RUNTIME_DIR, RUNTIME_SETPRIV, build_runtime, runtime_layer_id
from .store import (
    DEFAULT_TAG,
    TAG,
    assign_tags,
    build_record,
    layer_bytes,
    layers_dir,
    put_layer_in_place,
    read_record,
    split_ref,
)

if TYPE_CHECKING:
    from .s3store import S3TemplateStore

STEP_TYPES = ("RUN", "COPY", "ENV", "WORKDIR", "USER")
FILES_HASH = re.compile(r"^[0-9a-f]{64}$")  # the SDK's sha256 of a COPY step's files
# Made by `pmoves-e2b template build`: not replaceable through the API.
BUILT_IN = frozenset(TEMPLATES)
LAYER_FORMAT = "custom-2"  # bumped when a step makes a different layer from the same inputs
BASE_IMAGES = frozenset({"e2bdev/base", "e2bdev/base:latest"})
# Docker Hub's debian:<tag> that our `base` is (its os layer: debootstrap of bookworm, envd above).
DEBIAN_AS_BASE = frozenset({"bookworm", "12"})


class BuildRefused(ValueError):
    """A build request this server refuses as a whole (the API answers 400)."""


@dataclass(frozen=True)
class ImageSource:
    ref: ImageRef
    creds: Credentials | None
    envd: str  # the envd layer (base template's) put above the image
    os: str  # base's os layer: envd's runtime (python3.11, glibc) is taken from it


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()


@dataclass
class BuildState:
    template_id: str
    build_id: str
    cpu_count: float
    memory_mb: int
    tags: list[str] = field(default_factory=lambda: [DEFAULT_TAG])
    status: str = "waiting"  # waiting, building, ready, error
    entries: list[dict[str, Any]] = field(default_factory=list)
    reason: str = ""
    step: str = ""
    start_cmd: str = ""
    ready_cmd: str = ""
    created_at: str = field(default_factory=_now)
    updated_at: str = field(default_factory=_now)
    finished_at: str = ""

    def log(self, message: str, level: str = "info") -> None:
        self.entries.append({"timestamp": _now(), "level": level, "message": message})


class BuildJournal(Protocol):
    """Where build states outlive the process (``store/template_builds.py``)."""

    def save(self, state: BuildState) -> None: ...

    def load(self, build_id: str) -> BuildState | None: ...

    def of_template(self, template_id: str) -> list[BuildState]: ...


def build_tags(name: str, extra: Any) -> tuple[str, list[str]]:
    """The SDK's ``name[:tag]`` plus its ``tags``: (template id, tags); none given -> ``default``."""
    try:
        template_id, tag = split_ref(name)
    except ValueError as exc:
        raise BuildRefused(str(exc)) from None
    if extra is not None and (not isinstance(extra, list) or not all(isinstance(t, str) for t in extra)):
        raise BuildRefused("tags must be a list of strings")
    tags = ([tag] if ":" in name else []) + [t for t in extra or [] if t != tag or ":" not in name]
    for bad in (t for t in tags if not TAG.match(t)):
        raise BuildRefused(f"invalid tag {bad!r}: use letters, digits, '.', '_' and '-' (max 64)")
    return template_id, tags or [DEFAULT_TAG]


@dataclass(frozen=True)
class Step:
    kind: str
    args: tuple[str, ...]
    force: bool
    files_hash: str = ""


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
        if kind not in STEP_TYPES:
            raise BuildRefused(f"step {index + 1}: unknown step type {kind!r} (supported: {', '.join(STEP_TYPES)})")
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise BuildRefused(f"step {index + 1}: args must be a list of strings")
        need = {"RUN": (1, 2), "COPY": (2, 4), "WORKDIR": (1, 1), "USER": (1, 1)}.get(kind)
        if need and not need[0] <= len(args) <= need[1]:
            raise BuildRefused(f"step {index + 1}: {kind} takes {need[0]}..{need[1]} arguments, got {len(args)}")
        if kind == "ENV" and (len(args) % 2 or not args):
            raise BuildRefused(f"step {index + 1}: ENV takes name/value pairs")
        if kind == "WORKDIR" and not args[0].startswith("/"):
            raise BuildRefused(f"step {index + 1}: WORKDIR must be an absolute path")
        files_hash = ""
        if kind == "COPY":
            files_hash = str(item.get("filesHash") or "")
            if not FILES_HASH.match(files_hash):
                raise BuildRefused(f"step {index + 1}: COPY needs filesHash (64 hex digits)")
            if os.path.isabs(args[0]) or ".." in Path(args[0]).parts:
                raise BuildRefused(f"step {index + 1}: COPY source {args[0]!r} is outside the build context")
            if len(args) > 3 and args[3] and not re.fullmatch(r"[0-7]{3,4}", args[3]):
                raise BuildRefused(f"step {index + 1}: COPY mode {args[3]!r} is not an octal mode")
        steps.append(Step(kind, tuple(args), bool(item.get("force")), files_hash))
    return steps


def files_hash(archive: Path, src: str, dest: str) -> str:
    """The SDK's ``calculate_files_hash``, recomputed from the uploaded archive."""
    digest = hashlib.sha256(f"COPY {src} {dest}".encode())
    with tarfile.open(archive, "r:*") as tar:
        for member in tar.getmembers():
            kind = stat.S_IFDIR if member.isdir() else stat.S_IFLNK if member.issym() else stat.S_IFREG
            digest.update(member.name.encode())
            digest.update(str(kind | member.mode).encode())
            if member.issym():
                digest.update(str(len(member.linkname.encode())).encode())
                digest.update(member.linkname.encode())
                continue
            if not member.isdir():
                digest.update(str(member.size).encode())
                handle = tar.extractfile(member)
                if handle is not None:
                    while chunk := handle.read(1 << 20):
                        digest.update(chunk)
    return digest.hexdigest()


def check_archive(archive: Path) -> None:
    """Members stay inside the context: relative paths without '..', no hard links or devices, and
    nothing is written through a symlink (no member below one, none replacing one), so a symlink may
    point anywhere (the SDK keeps absolute ones as they are) and is only ever unpacked as a link."""
    with tarfile.open(archive, "r:*") as tar:
        _check_members(tar)


def _check_members(tar: tarfile.TarFile) -> None:
    links: set[tuple[str, ...]] = set()
    seen: set[tuple[str, ...]] = set()
    for member in tar.getmembers():
        name = Path(member.name)
        if name.is_absolute() or ".." in name.parts:
            raise BuildRefused(f"uploaded files: {member.name!r} is outside the build context")
        if member.islnk() or member.isdev():
            raise BuildRefused(f"uploaded files: {member.name!r} is a hard link or device")
        parts = tuple(part for part in name.parts if part != ".")
        if any(parts[:i] in links for i in range(1, len(parts) + 1)) or (member.issym() and parts in seen):
            raise BuildRefused(f"uploaded files: {member.name!r} would be written through a symlink")
        seen.add(parts)
        if member.issym():
            links.add(parts)


def _unpack_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    """tarfile's "data" filter, except that symlinks keep any target: ``check_archive`` made sure
    nothing is unpacked through one, and the files are copied into the rootfs as links (cp -P)."""
    if member.issym():
        return member.replace(uid=0, gid=0, uname="root", gname="root", deep=False)  # COPY sets the owner
    return tarfile.data_filter(member, dest)


def release_image_is_base(image: str) -> bool:
    """True for Docker Hub's debian:bookworm / debian:12 (``from_debian_image("bookworm")``): built on
    our `base` (its os layer is that release, debootstrapped), no pull. Other images are pulled."""
    try:
        ref = parse_image(image)
    except ValueError:
        return False  # the image path words the error
    return ref.registry == "docker.io" and ref.path == "library/debian" and ref.tag in DEBIAN_AS_BASE and not ref.digest


class CustomBuilds:
    """Build states by build id: in memory while this process builds, saved to the journal at
    each change of status (a build a restart interrupted is marked failed by the journal)."""

    def __init__(
        self,
        templates_dir: Path,
        host: HostConfig | None = None,
        journal: BuildJournal | None = None,
        remote: S3TemplateStore | None = None,
    ) -> None:
        self.templates_dir = templates_dir
        self._host = host
        self._journal = journal
        self._remote = remote  # E2B_TEMPLATE_STORE: the layers a build made and its record go there too
        self._made: list[str] = []  # layers the running build made (builds run one at a time)
        self.builds: dict[str, BuildState] = {}
        self._lock = threading.Lock()  # one build at a time: they share the layers dir

    def upload_path(self, digest: str) -> Path:
        return self.templates_dir / "uploads" / f"{digest}.tar"

    def request(self, name: str, cpu_count: float, memory_mb: int, tags: Any = None) -> BuildState:
        template_id, assigned = build_tags(name, tags)
        if template_id in BUILT_IN:
            raise BuildRefused(f"template '{template_id}' is built in; choose another name")
        state = BuildState(template_id, str(uuid.uuid4()), cpu_count, memory_mb, assigned)
        self.builds[state.build_id] = state
        self._save(state)
        return state

    def get(self, template_id: str, build_id: str) -> BuildState:
        state = self.builds.get(build_id)
        if state is None and self._journal is not None:
            state = self._journal.load(build_id)
        if state is None or state.template_id != template_id:
            raise KeyError(f"build '{build_id}' of template '{template_id}' not found")
        return state

    def of_template(self, template_id: str) -> list[BuildState]:
        """This template's builds, oldest first (those of this process as they are now)."""
        saved = {s.build_id: s for s in (self._journal.of_template(template_id) if self._journal else [])}
        saved.update({b: s for b, s in self.builds.items() if s.template_id == template_id})
        return sorted(saved.values(), key=lambda s: s.created_at)

    def _save(self, state: BuildState) -> None:
        state.updated_at = _now()
        if self._journal is not None:
            self._journal.save(state)

    def start(self, state: BuildState, body: dict[str, Any]) -> None:
        """Validate the whole request first (nothing is written for a refused one), then build in a thread."""
        if state.status != "waiting":
            raise BuildRefused(f"build '{state.build_id}' was already started")
        parent = body.get("fromTemplate")
        image, registry = body.get("fromImage"), body.get("fromImageRegistry")
        source: dict[str, Any] | ImageSource
        if parent and (image or registry):
            raise BuildRefused("give fromTemplate or fromImage, not both")
        if image in BASE_IMAGES and not registry:
            parent = "base"  # from_base_image(): our `base` template is E2B's base image's counterpart
        elif isinstance(image, str) and not registry and release_image_is_base(image):
            parent = "base"
        if parent or not (image or registry):
            source = self._template_source(parent)
        else:
            source = self._image_source(image, registry)
        steps = parse_steps(body.get("steps"))
        start_cmd, ready_cmd = body.get("startCmd") or "", body.get("readyCmd") or ""
        if not isinstance(start_cmd, str) or not isinstance(ready_cmd, str):
            raise BuildRefused("startCmd and readyCmd must be strings")
        state.start_cmd, state.ready_cmd = start_cmd, ready_cmd
        for index, step in enumerate(steps, start=1):
            if step.kind != "COPY":
                continue
            archive = self.upload_path(step.files_hash)
            if not archive.is_file():
                raise BuildRefused(f"step {index}: the files of COPY {step.args[0]} were not uploaded")
            try:
                check_archive(archive)
                actual = files_hash(archive, step.args[0], step.args[1])
            except (tarfile.TarError, OSError) as exc:
                raise BuildRefused(f"step {index}: the uploaded files are not a tar archive: {exc}") from None
            if actual != step.files_hash:
                raise BuildRefused(f"step {index}: file hash mismatch for COPY {step.args[0]} (uploaded files differ)")
        state.status = "building"
        self._save(state)
        threading.Thread(target=self._run, args=(state, source, steps, bool(body.get("force"))), daemon=True).start()

    def _template_source(self, parent: object) -> dict[str, Any]:
        if not isinstance(parent, str) or not parent:
            raise BuildRefused("fromTemplate is required (the template to build on, e.g. 'base')")
        try:
            parent_name, parent_tag = split_ref(parent)
            parent_record = build_record(read_record(self.templates_dir, parent_name), parent_tag)
        except (ValueError, TemplateNotFound):
            parent_record = None
        if parent_record is None:
            raise BuildRefused(f"fromTemplate '{parent}' is not a built template")
        return parent_record

    def _image_source(self, image: object, registry: object) -> ImageSource:
        if not isinstance(image, str) or not image:
            raise BuildRefused("fromImageRegistry needs fromImage (the image to pull)")
        try:
            ref = parse_image(image)
        except ValueError as exc:
            raise BuildRefused(str(exc)) from None
        creds = None
        if registry is not None:
            if not isinstance(registry, dict) or registry.get("type") != "registry":
                kind = registry.get("type") if isinstance(registry, dict) else registry
                raise BuildRefused(f"fromImageRegistry type {kind!r} is not supported here: use 'registry' credentials")
            extra = set(registry) - {"type", "username", "password"}
            user, password = registry.get("username"), registry.get("password")
            if extra or not (isinstance(user, str) and user and isinstance(password, str) and password):
                raise BuildRefused("fromImageRegistry takes type 'registry', username and password (non-empty)")
            creds = Credentials(user, password)
        try:
            base = read_record(self.templates_dir, "base")
        except TemplateNotFound:
            raise BuildRefused("images need the built template 'base' (its envd layer goes on top)") from None
        envd = next((layer for layer in base["layers"] if str(layer).startswith("envd-")), None)
        if envd is None or not str(base["layers"][-1]).startswith("os-"):
            raise BuildRefused(
                "the 'base' template has no envd and os layers: rebuild it (pmoves-e2b template build base)"
            )
        return ImageSource(ref, creds, str(envd), str(base["layers"][-1]))

    def _image_base(self, state: BuildState, source: ImageSource, force: bool) -> dict[str, Any]:
        """The image's rootfs (pulled once per manifest digest), envd above it, then a layer that
        gives it E2B's user: a parent record as a template's would be."""
        root = layers_dir(self.templates_dir)
        root.mkdir(parents=True, exist_ok=True)
        name = source.ref.transport.removeprefix("docker://")
        state.log(f"FROM {name}: asking the registry for its digest")
        digest = image_digest(source.ref, source.creds)
        lid = f"image-{hashlib.sha256(digest.encode()).hexdigest()[:16]}"
        final = root / lid
        if final.is_dir() and not force:
            state.log(f"CACHED FROM {name} ({digest})")
        else:
            state.log(f"pulling {name} ({digest})")
            started = time.monotonic()

            def pulled(tmp: Path) -> list[str]:
                pull_rootfs(source.ref, source.creds, tmp)
                return []

            self._new_layer(final, pulled, make_dir=False)  # umoci makes the dir
            state.log(f"image unpacked in {time.monotonic() - started:.1f} s")
        # E2B's user and what a sandbox needs, written from here (the image may have no shell or libc)
        setup = (
            root / f"custom-{hashlib.sha256(json.dumps([LAYER_FORMAT, SETUP_FORMAT, lid]).encode()).hexdigest()[:16]}"
        )
        if not setup.is_dir() or force:
            state.log("setting up the image for sandboxes (user 'user', /bin/sh)")
            for line in self._new_layer(setup, lambda tmp: set_up_image(final, tmp)):
                state.log(line)
        # envd's own python3.11 and glibc: envd runs the same on any userland (none of it is the image's)
        runtime = root / runtime_layer_id(source.os, source.envd)
        if not runtime.is_dir():
            state.log("making envd's runtime (python3.11 and glibc, from base's os layer)")
            for line in self._new_layer(runtime, lambda tmp: build_runtime(root / source.os, root / source.envd, tmp)):
                state.log(line)
        layers = [setup.name, runtime.name, source.envd, lid]
        return {"layers": layers, "user": "user", "workdir": "/home/user", "image": digest}

    def _new_layer(self, final: Path, fill: Callable[[Path], list[str]], make_dir: bool = True) -> list[str]:
        """A layer made by ``fill`` in ``.tmp-<id>`` and renamed into place when complete."""
        tmp = final.with_name(f".tmp-{final.name}")
        remove_tree(tmp)
        if make_dir:
            tmp.mkdir(mode=0o755)
        try:
            lines = fill(tmp)
        except BaseException:
            remove_tree(tmp)
            raise
        put_layer_in_place(tmp, final)
        self._made.append(final.name)
        return lines

    def _run(self, state: BuildState, source: dict[str, Any] | ImageSource, steps: list[Step], force: bool) -> None:
        try:
            with self._lock:
                self._made = []
                if isinstance(source, ImageSource):
                    source = self._image_base(state, source, force)
                self._build(state, source, steps, force)
            state.status = "ready"
        except Exception as exc:  # noqa: BLE001 - the build's outcome goes to the SDK, a thread has no caller
            state.reason = str(exc)
            state.log(str(exc), "error")
            state.status = "error"
        state.finished_at = _now()
        try:
            self._save(state)
        finally:
            if self._journal is not None:
                self.builds.pop(state.build_id, None)  # the journal answers from now on

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
            if step.kind not in ("RUN", "COPY"):
                state.log(title)
                continue
            user_arg = 1 if step.kind == "RUN" else 2  # RUN cmd [user]; COPY src dest [user [mode]]
            run_as = step.args[user_arg] if len(step.args) > user_arg and step.args[user_arg] else user
            inputs = [LAYER_FORMAT, layers[0], step.kind, *step.args, step.files_hash, run_as, workdir, env]
            digest = hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:16]
            lid = f"custom-{digest}"
            final = root / lid
            if final.is_dir() and not (force or step.force):
                state.log(f"CACHED {title}")
                layers.insert(0, lid)
                continue
            state.log(title)
            lowers = [root / layer for layer in layers]
            if step.kind == "RUN":
                size += self._run_layer(state, final, lowers, step.args[0], run_as, workdir, env, host)
            else:
                size += self._copy_layer(state, final, lowers, step, run_as, workdir, host)
            layers.insert(0, lid)
        if self._remote is not None:  # before the tags move: a failed upload fails the build
            state.log(f"uploading {len(self._made)} new layer(s) to {self._remote.url}")
            started = time.monotonic()
            self._remote.push_layers(self.templates_dir, self._made)
            state.log(f"uploaded in {time.monotonic() - started:.1f} s")
        assign_tags(
            self.templates_dir,
            state.template_id,
            state.tags,
            {
                **{
                    k: v
                    for k, v in parent.items()
                    if k not in ("layers", "name", "built_at", "size_bytes", "tags", "builds")
                },
                "name": state.template_id,
                "layers": layers,
                "user": user,
                "workdir": workdir,
                # set_start_cmd: runs as the last USER at sandbox start; create returns once readyCmd exits 0.
                "start_user": user if state.start_cmd else parent.get("start_user", ""),
                "start_cmd": state.start_cmd or parent.get("start_cmd", ""),
                "ready_cmd": state.ready_cmd if state.start_cmd else parent.get("ready_cmd", ""),
                "memory_mb": state.memory_mb or parent.get("memory_mb", 0),
                "cpu_count": state.cpu_count or parent.get("cpu_count", 0),
                "built_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "size_bytes": size,
                "build_id": state.build_id,
            },
        )
        if self._remote is not None:
            self._remote.push_record(self.templates_dir, state.template_id)

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
        # E2B's words for a user the image does not have (its SDK tests match them).
        unknown = f"failed to run command '{command}': command failed: unauthenticated: invalid username: '{user}'"
        script = f"id -u {q(user)} >/dev/null 2>&1 || {{ echo {q(unknown)} >&2; exit 1; }}; "
        script += f"[ -d {q(workdir)} ] || install -d -o {q(user)} -g {group} {q(workdir)}; cd {q(workdir)} && "
        if user == "root":
            script += command
        else:
            # from the file, not getent: images without glibc have none
            home = f"$(grep {q(f'^{user}:')} /etc/passwd | cut -d: -f6)"
            # Images without util-linux (busybox, alpine): envd's runtime's setpriv (a layer below).
            script += (
                "if command -v runuser >/dev/null; then "
                f"exec runuser -u {q(user)} -- env HOME={home} bash -c {q(command)}; "
                f"elif [ -x {RUNTIME_DIR}/bin/setpriv ]; then exec {RUNTIME_SETPRIV} --reuid=$(id -u {q(user)}) "
                f"--regid=$(id -g {q(user)}) --init-groups -- env HOME={home} /bin/bash -c {q(command)}; "
                "else echo 'this image has no runuser (util-linux) to run a step as another user' >&2; exit 1; fi"
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
        put_layer_in_place(tmp, final)
        self._made.append(final.name)
        state.log(f"layer {final.name} built in {time.monotonic() - started:.1f} s")
        return layer_bytes(final)

    def _copy_layer(
        self, state: BuildState, final: Path, lowers: list[Path], step: Step, user: str, workdir: str, host: HostConfig
    ) -> int:
        """COPY: the uploaded files, unpacked on the host, copied in by root inside the rootfs (so
        owners resolve against the rootfs's users), then owned by ``user`` with the step's mode."""
        src, dest = step.args[0], step.args[1]
        mode = step.args[3] if len(step.args) > 3 else ""
        with tempfile.TemporaryDirectory(prefix="pmoves-copy-") as scratch:
            staging = Path(scratch) / "files"
            staging.mkdir()
            with tarfile.open(self.upload_path(step.files_hash), "r:*") as tar:
                _check_members(tar)  # again: the upload may have been replaced since the build started
                tar.extractall(staging, filter=_unpack_filter)  # noqa: S202 - members checked, links kept as links
            # Docker's rule: a directory's contents go into dest; a file goes into dest/ or becomes dest.
            base = staging / src
            inside = f"{HOST_MOUNT_PREFIX}{staging}"
            q = shlex.quote
            target = dest if dest.startswith("/") else f"{workdir}/{dest}"
            if base.is_dir():
                script = f"mkdir -p {q(target)} && cp -rP {q(f'{inside}/{src}/.')} {q(target)}"
                owned = [f"{target.rstrip('/')}/{p.name}" for p in base.iterdir()]
            else:
                files = sorted(p for p in staging.rglob("*") if p.is_file() or p.is_symlink())
                if target.endswith("/") or len(files) > 1:
                    sources = " ".join(q(f"{inside}/{f.relative_to(staging)}") for f in files)
                    script = f"mkdir -p {q(target)} && cp -P {sources} {q(target)}"
                    owned = [f"{target.rstrip('/')}/{f.name}" for f in files]
                else:
                    parent = os.path.dirname(target) or "/"
                    script = f"mkdir -p {q(parent)} && cp -P {q(f'{inside}/{src}')} {q(target)}"
                    owned = [target]
            if base.is_dir() or target.endswith("/") or len(owned) > 1:
                # A destination dir this COPY creates is the user's too (Docker's --chown does that).
                script = f"[ -e {q(target)} ] || made=1; {script}"
                script += f' && {{ [ -z "${{made:-}}" ] || chown {q(user)}:"$(id -gn {q(user)})" {q(target)}; }}'
            if owned:
                paths = " ".join(q(p) for p in owned)
                script += f' && chown -hR {q(user)}:"$(id -gn {q(user)})" {paths}'
                if mode:
                    script += f" && chmod -R {q(mode)} {paths}"
            staged = dataclasses.replace(host, host_paths=(*host.host_paths, str(staging)))
            return self._run_layer(state, final, lowers, script, "root", "/", {}, staged)
