"""Builder behaviour with small layers of our own: caching, rebuild of exactly the changed
layer, atomic results, locking, clear failures, the loader. Runs in a temp templates dir."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from pmoves_e2b.sandbox.templates import definitions
from pmoves_e2b.sandbox.templates.builder import TemplateBuilder
from pmoves_e2b.sandbox.templates.errors import TemplateBuildError, TemplateNotFound
from pmoves_e2b.sandbox.templates.hostconfig import read_host_config
from pmoves_e2b.sandbox.templates.model import BuildContext, LayerSpec, Step, TemplateSpec
from pmoves_e2b.sandbox.templates.rootfs import mounts_under
from pmoves_e2b.sandbox.templates.store import list_templates, load_template


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.lock_waited = threading.Event()

    def waiting_for_lock(self, path: Path) -> None:
        self.lock_waited.set()

    def layer_cached(self, layer: str, path: Path) -> None:
        self.events.append(("cached", layer))

    def layer_started(self, layer: str, steps: Sequence[str]) -> None:
        self.events.append(("started", layer))

    def step_started(self, layer: str, index: int, title: str) -> None: ...

    def step_finished(self, layer: str, index: int, title: str, seconds: float) -> None:
        self.events.append(("step", f"{layer}:{title}"))

    def layer_finished(self, layer: str, path: Path, seconds: float, size_bytes: int) -> None:
        self.events.append(("built", layer))

    def built(self) -> list[str]:
        return [layer for kind, layer in self.events if kind == "built"]


def writer(relpath: str, source: Path) -> Step:
    """A step that copies ``source`` into the layer; the file content is a layer input."""

    def run(ctx: BuildContext) -> None:
        dest = ctx.target / relpath
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)

    return Step(f"write {relpath}", run, relpath)


@pytest.fixture
def world(tmp_path: Path):
    """Two layers: ``bottom`` and ``top`` (like os and envd), and a template of both."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "bottom.txt").write_text("bottom v1")
    (inputs / "top.txt").write_text("top v1")
    layers = {
        "bottom": LayerSpec(
            "bottom",
            (writer("etc/bottom", inputs / "bottom.txt"),),
            inputs=lambda host: (inputs / "bottom.txt").read_bytes(),
        ),
        "top": LayerSpec(
            "top", (writer("opt/top", inputs / "top.txt"),), inputs=lambda host: (inputs / "top.txt").read_bytes()
        ),
    }
    templates = {"mini": TemplateSpec("mini", ("top", "bottom"), start_cmd="run-me", ready_port=1234)}
    host = read_host_config()

    def builder(reporter: Recorder | None = None) -> TemplateBuilder:
        return TemplateBuilder(
            tmp_path / "templates", reporter=reporter or Recorder(), layers=layers, templates=templates, host=host
        )

    return inputs, builder, tmp_path / "templates"


def test_first_build_builds_every_layer_and_the_loader_returns_them_topmost_first(world) -> None:
    inputs, builder, root = world
    rec = Recorder()
    builder(rec).build("mini")
    assert rec.built() == ["bottom", "top"]
    image = load_template("mini", root)
    assert [Path(p).name.split("-")[0] for p in image.layers] == ["top", "bottom"]
    assert Path(image.layers[0], "opt/top").read_text() == "top v1"
    assert Path(image.layers[1], "etc/bottom").read_text() == "bottom v1"
    assert (image.start_cmd, image.ready_port, image.user, image.workdir) == ("run-me", 1234, "user", "/home/user")
    assert [t.name for t in list_templates(root)] == ["mini"]
    assert not [p for p in (root / "layers").iterdir() if p.name.startswith(".")]


def test_second_build_is_a_no_op(world) -> None:
    _, builder, root = world
    builder().build("mini")
    before = {p.name: p.stat().st_mtime_ns for p in (root / "layers").iterdir()}
    rec = Recorder()
    builder(rec).build("mini")
    assert rec.built() == []
    assert [kind for kind, _ in rec.events] == ["cached", "cached"]
    assert {p.name: p.stat().st_mtime_ns for p in (root / "layers").iterdir()} == before


def test_changing_the_top_layer_input_rebuilds_only_that_layer(world) -> None:
    inputs, builder, root = world
    builder().build("mini")
    old = load_template("mini", root)
    (inputs / "top.txt").write_text("top v2")
    rec = Recorder()
    builder(rec).build("mini")
    assert rec.built() == ["top"]
    new = load_template("mini", root)
    assert new.layers[1] == old.layers[1]
    assert new.layers[0] != old.layers[0]
    assert Path(new.layers[0], "opt/top").read_text() == "top v2"


def test_force_rebuilds_everything_in_place(world) -> None:
    _, builder, root = world
    builder().build("mini")
    old = load_template("mini", root)
    rec = Recorder()
    builder(rec).build("mini", force=True)
    assert rec.built() == ["bottom", "top"]
    assert load_template("mini", root) == old
    assert all(Path(p).is_dir() for p in old.layers)
    # The replaced builds stay until pruned: sandboxes may still run on them.
    replaced = sorted(p.name.split("~")[0] for p in (root / "layers").glob("*~replaced-*"))
    assert replaced == sorted(Path(p).name for p in old.layers)
    assert len(builder().prune()) == 2
    assert load_template("mini", root) == old


def test_a_failing_step_leaves_no_layer_and_says_where_the_log_is(world) -> None:
    inputs, _, root = world

    def fail(ctx: BuildContext) -> None:
        (ctx.target / "half-done").write_text("x")
        ctx.run(["sh", "-c", "echo the-reason >&2; exit 3"])

    layers = {"bad": LayerSpec("bad", (Step("doomed", fail, "1"),))}
    builder = TemplateBuilder(root, layers=layers, templates={"t": TemplateSpec("t", ("bad",))})
    with pytest.raises(TemplateBuildError, match=r"(?s)step 'doomed' failed.*the-reason"):
        builder.build("t")
    assert [p.name for p in (root / "layers").iterdir()] == []
    assert list((root / "logs").glob("bad-*.log"))
    with pytest.raises(TemplateNotFound):
        load_template("t", root)


def test_two_builds_at_once_take_turns(world) -> None:
    inputs, _, root = world
    gate = threading.Event()
    entered = threading.Event()

    def slow(ctx: BuildContext) -> None:
        entered.set()
        assert gate.wait(30)
        (ctx.target / "done").write_text("1")

    layers = {"slow": LayerSpec("slow", (Step("slow step", slow, "1"),))}
    templates = {"t": TemplateSpec("t", ("slow",))}
    first, second = Recorder(), Recorder()
    errors: list[BaseException] = []

    def run(rec: Recorder) -> None:
        try:
            TemplateBuilder(root, reporter=rec, layers=layers, templates=templates).build("t")
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    t1 = threading.Thread(target=run, args=(first,))
    t1.start()
    assert entered.wait(30)
    t2 = threading.Thread(target=run, args=(second,))
    t2.start()
    assert second.lock_waited.wait(30)
    gate.set()
    t1.join(30)
    t2.join(30)
    assert errors == []
    assert first.built() == ["slow"]
    assert second.events == [("cached", "slow")]


def test_unknown_or_malformed_template_names_are_not_found(world) -> None:
    _, builder, root = world
    builder().build("mini")
    for name in ("nope", "../mini", "mini/../mini", "", "MINI"):
        with pytest.raises(TemplateNotFound):
            load_template(name, root)
    with pytest.raises(TemplateNotFound):
        builder().build("nope")


def test_a_template_whose_layer_vanished_is_not_found(world) -> None:
    _, builder, root = world
    builder().build("mini")
    shutil.rmtree(load_template("mini", root).layers[0])
    with pytest.raises(TemplateNotFound):
        load_template("mini", root)
    assert list_templates(root) == []


def test_builtin_envd_change_moves_only_the_envd_layer_id(tmp_path: Path, monkeypatch) -> None:
    """The real definitions: a change to envd's code changes the envd layer id and no other."""
    host = read_host_config()
    before = TemplateBuilder(tmp_path, host=host)
    order = before.build_order("code-interpreter-v1")
    assert set(order) == {"os", "envd", "kernels", "interpreter"}
    ids = {name: before.layer_id(name) for name in order}
    assert ids == {name: TemplateBuilder(tmp_path, host=host).layer_id(name) for name in order}  # stable

    package = tmp_path / "pmoves_e2b"
    shutil.copytree(definitions.PACKAGE_DIR, package, ignore=shutil.ignore_patterns("__pycache__"))
    (package / "envd" / "__init__.py").write_text((package / "envd" / "__init__.py").read_text() + "\n# changed\n")
    monkeypatch.setattr(definitions, "PACKAGE_DIR", package)
    after = TemplateBuilder(tmp_path, host=host)
    changed = {name for name in order if after.layer_id(name) != ids[name]}
    assert changed == {"envd"}

    (package / "interpreter" / "__init__.py").write_text("# changed too\n")
    assert {name for name in order if TemplateBuilder(tmp_path, host=host).layer_id(name) != ids[name]} == {
        "envd",
        "interpreter",
    }


def test_stale_layers_and_prune_of_older_builds(world) -> None:
    inputs, builder, root = world
    builder().build("mini")
    old = load_template("mini", root)
    (inputs / "top.txt").write_text("top v2")
    record_layers = [Path(p).name for p in old.layers]
    assert builder().stale_layers("mini", record_layers) == ["top"]
    builder().build("mini")
    assert builder().prune() == [Path(old.layers[0])]
    assert not Path(old.layers[0]).exists()
    new = load_template("mini", root)
    assert all(Path(p).is_dir() for p in new.layers)
    assert builder().prune() == []


def test_a_killed_builder_leaves_no_build_process_and_no_mount(tmp_path: Path) -> None:
    marker = tmp_path / "mnt"
    marker.mkdir()
    code = (
        "import sys; from pmoves_e2b.sandbox.templates.rootfs import run_private; "
        f"run_private('mount -t tmpfs tmpfs {marker} && touch {marker}/inside && exec sleep 4243', sys.stdout)"
    )
    builder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL)

    def sleepers() -> list[str]:
        # the build command itself (-x: whole command line), not the builder whose -c code names it
        out = subprocess.run(["pgrep", "-x", "-f", "sleep 4243"], capture_output=True, text=True).stdout
        return out.split()

    deadline = time.monotonic() + 30
    while not sleepers():
        assert time.monotonic() < deadline, "the build command never started"
        time.sleep(0.05)
    os.kill(builder.pid, signal.SIGKILL)
    builder.wait(10)
    deadline = time.monotonic() + 10
    while sleepers():
        assert time.monotonic() < deadline, "build processes outlived the builder"
        time.sleep(0.05)
    assert mounts_under(marker) == []
    assert list(marker.iterdir()) == []  # the tmpfs was only ever mounted in the build's namespace


def test_a_registry_step_that_fails_once_is_retried(tmp_path: Path) -> None:
    attempts: list[int] = []

    def flaky(ctx: BuildContext) -> None:
        attempts.append(1)
        if len(attempts) == 1:
            ctx.run(["sh", "-c", "echo 'Temporary failure resolving deb.debian.org' >&2; exit 100"])
        (ctx.target / "ok").write_text("1")

    layers = {"net": LayerSpec("net", (Step("download", flaky, "1", retries=2),))}
    builder = TemplateBuilder(tmp_path, layers=layers, templates={"t": TemplateSpec("t", ("net",))}, retry_delay=0)
    builder.build("t")
    assert len(attempts) == 2
    assert Path(load_template("t", tmp_path).layers[0], "ok").read_text() == "1"
    log = next((tmp_path / "logs").glob("net-*.log")).read_text()
    assert "Temporary failure" in log and "retry 1 of 2" in log
