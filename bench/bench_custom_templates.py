"""Custom templates built through E2B's build API with the stock SDK (issue 15).

Starts its own stack on a private templates dir (the shared built-in layers linked in, so builds
write only there). Measures: a small template on base built cold (a fresh marker, nothing cached)
vs rebuilt with every step cached; the bytes its layers add; create+kill from the custom template
vs from `base` in the same run, with the warm pool off and on (a custom template is pooled by
demand: creates of it in the last minute); from_image templates, one of a static busybox image
(envd on its own runtime), built and created.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from measure import pct, timed  # noqa: E402
from stack.harness import link_shared_templates, make_stack, stop_and_clean  # noqa: E402

from pmoves_e2b.config import SHARED_TEMPLATES_DIR  # noqa: E402


def private_templates(shared: Path) -> Path:
    return link_shared_templates(shared, Path(tempfile.mkdtemp(prefix="pmoves-bench-templates-")))


def layer_bytes(root: Path, pattern: str) -> int:
    layers = [str(p) for p in (root / "layers").glob(pattern) if p.is_dir() and not p.is_symlink()]
    if not layers:
        return 0
    out = subprocess.run(["du", "-scb", *layers], capture_output=True, text=True, check=True).stdout
    return int(out.splitlines()[-1].split()[0])


def build_twice(template: object, name: str) -> tuple[float, float]:
    """Seconds of a first build and of the same build again (every step cached)."""
    from e2b import Template

    seconds = []
    for _ in range(2):
        started = time.monotonic()
        Template.build(template, name)  # type: ignore[arg-type]
        seconds.append(time.monotonic() - started)
    return seconds[0], seconds[1]


def from_image_rows(templates: Path, name: str) -> list[tuple[str, str]]:
    """from_image() of a ~130 MB image (our os layer, trimmed) in a registry on loopback: pull+unpack
    (cold) vs the same digest again (cached), and the bytes of the unpacked image layer."""
    from compat.oci_registry import busybox_rootfs, image_layout, push, rootfs_layout, running_registry
    from e2b import Template

    rows: list[tuple[str, str]] = []
    scratch = Path(tempfile.mkdtemp(prefix="pmoves-bench-registry-"))
    try:
        with running_registry(scratch) as registry:
            base = json.loads((templates / "base.json").read_text())
            image_layout((templates / "layers" / base["layers"][-1]).resolve(), scratch / "oci", name)
            push(scratch / "oci", registry, "bench/image:v1")
            template = (
                Template()
                .from_image(
                    f"{registry.address}/bench/image:v1", username=registry.username, password=registry.password
                )
                .run_cmd("true")
            )
            cold, cached = build_twice(template, name)
            rows.append(("from_image build cold (pull+unpack+setup+runtime)", f"{cold * 1000:.0f} ms"))
            rows.append(
                ("from_image build cached (baseline: cold)", f"{cached * 1000:.0f} ms  ratio {cached / cold:.3f}")
            )
            rows.append(("bytes of the unpacked image layer", f"{layer_bytes(templates, 'image-*')}"))
            rows.append(("bytes of envd's runtime layer (once per envd+os)", f"{layer_bytes(templates, 'runtime-*')}"))
            # a static busybox (no libc, no python): envd on its own runtime, already built above
            if busybox_rootfs(scratch / "busybox"):
                rootfs_layout(scratch / "busybox", scratch / "oci-busybox")
                push(scratch / "oci-busybox", registry, "bench/busybox:v1")
                busybox = Template().from_image(
                    f"{registry.address}/bench/busybox:v1", username=registry.username, password=registry.password
                )
                cold, _ = build_twice(busybox, f"{name}-busybox")
                rows.append(("from_image busybox build cold (pull+setup)", f"{cold * 1000:.0f} ms"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=8, help="creates per row")
    args = parser.parse_args()
    from e2b import Sandbox, Template

    templates = private_templates(Path(os.environ.get("E2B_TEMPLATES_DIR", SHARED_TEMPLATES_DIR)))
    rows: list[tuple[str, str]] = []
    for pool in ("0", "1"):
        stack = make_stack({"E2B_TEMPLATES_DIR": str(templates), "E2B_POOL_SIZE": pool})
        try:
            stack.up()
            os.environ.update(stack.sdk_env)
            if pool == "0":
                name = f"bench-{uuid.uuid4().hex[:8]}"
                template = (
                    Template()
                    .from_template("base")
                    .set_envs({"MARKER": name})
                    .run_cmd("echo $MARKER > /etc/bench-marker && mkdir -p /opt/bench", user="root")
                    .run_cmd("python3 -c 'print(1)' > /home/user/one.txt")
                )
                cold, cached = build_twice(template, name)
                rows.append(("build cold (2 RUN steps on base)", f"{cold * 1000:.0f} ms"))
                rows.append(("build all cached (baseline: cold)", f"{cached * 1000:.0f} ms  ratio {cached / cold:.3f}"))
                rows.append(("bytes the custom layers add", f"{layer_bytes(templates, 'custom-*')}"))
                image_name = f"bench-image-{uuid.uuid4().hex[:8]}"
                rows += from_image_rows(templates, image_name)
                for label, tpl in (
                    ("create+kill custom, pool off", name),
                    ("create+kill from_image template, pool off", image_name),
                    ("create+kill from_image busybox, pool off", f"{image_name}-busybox"),
                    ("create+kill base, pool off (baseline)", "base"),
                ):
                    if not Template.exists(tpl):  # busybox: apt-get download failed
                        continue
                    ms = timed(lambda tpl=tpl: Sandbox.create(template=tpl, timeout=60).kill(), args.runs, warmup=1)
                    rows.append(
                        (label, f"p50 {statistics.median(ms):.0f} ms  p95 {pct(ms, 0.95):.0f} ms  n={args.runs}")
                    )
            else:
                # Custom templates have no pool floor: the pool follows their demand (creates in the
                # last minute), so a few creates first, then time them as users keep creating.
                for tpl in (name, name, "base"):
                    Sandbox.create(template=tpl, timeout=60).kill()
                time.sleep(3)  # let the pool fill
                for label, tpl in (("create+kill custom, pool on", name), ("create+kill base, pool on", "base")):
                    ms = timed(lambda tpl=tpl: Sandbox.create(template=tpl, timeout=60).kill(), args.runs, warmup=1)
                    rows.append(
                        (label, f"p50 {statistics.median(ms):.0f} ms  p95 {pct(ms, 0.95):.0f} ms  n={args.runs}")
                    )
        finally:
            stop_and_clean(stack)
    shutil.rmtree(templates, ignore_errors=True)
    for label, value in rows:
        print(f"{label:45s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
