"""Template builds: what each layer cost when it was built, and the cached paths, each next to a
baseline from the same run.

Run (root): ``.venv/bin/python bench/bench_templates.py [--runs N]``. Reads the shared templates
dir (``make templates`` builds it); builds only into temp dirs.

| number | baseline |
|---|---|
| per-layer and per-step build time and size (recorded at build time) | - |
| no-op ``pmoves-e2b template build --all`` (everything cached) | ``pmoves-e2b template --help`` (CLI start) |
| envd-only rebuild (the envd layer alone, into a temp dir) | bare ``pip install --target`` of envd's wheels |
| ``load_template("code-interpreter-v1")`` | ``json.loads`` of its record file |
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from pmoves_e2b.sandbox.templates import definitions  # noqa: E402
from pmoves_e2b.sandbox.templates.builder import TemplateBuilder  # noqa: E402
from pmoves_e2b.sandbox.templates.model import TemplateSpec  # noqa: E402
from pmoves_e2b.sandbox.templates.store import default_templates_dir, load_template, read_record  # noqa: E402

CLI = [str(Path(sys.executable).with_name("pmoves-e2b"))]


def wall(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - started


def row(name: str, value: float, baseline: float, unit: str = "s") -> None:
    print(f"{name:58s} {value:9.3f} {unit}   baseline {baseline:9.3f} {unit}   ratio {value / baseline:6.2f}")


def recorded_builds(root: Path) -> None:
    print(f"recorded builds in {root}:")
    for template in definitions.TEMPLATES:
        try:
            record = read_record(root, template)
        except Exception:  # noqa: BLE001 - a template that is not built is reported, not fatal
            print(f"  {template}: not built")
            continue
        print(f"  {template}: {record['size_bytes'] / 1e6:.0f} MB in {len(record['layers'])} layers")
        for layer in record["layers"]:
            meta = json.loads((root / "layers" / f"{layer}.json").read_text())
            steps = ", ".join(f"{title} {seconds:.0f}s" for title, seconds in meta["steps"].items())
            print(f"    {layer:32s} {meta['seconds']:6.0f} s {meta['size_bytes'] / 1e6:7.0f} MB   [{steps}]")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    options = parser.parse_args()
    root = default_templates_dir()
    recorded_builds(root)

    noop = statistics.median(wall([*CLI, "template", "build", "--all"]) for _ in range(options.runs))
    cli_start = statistics.median(wall([*CLI, "template", "--help"]) for _ in range(options.runs))
    row("no-op template build --all (median)", noop, cli_start)

    envd_only, pip_only = [], []
    for _ in range(options.runs):
        with tempfile.TemporaryDirectory() as tmp:
            builder = TemplateBuilder(Path(tmp), templates={"envd-only": TemplateSpec("envd-only", ("envd",))})
            started = time.perf_counter()
            builder.build("envd-only")
            envd_only.append(time.perf_counter() - started)
            platforms = [arg for p in definitions.TARGET_PLATFORMS for arg in ("--platform", p)]
            pip_only.append(
                wall(
                    [
                        sys.executable,
                        "-m",
                        "pip",
                        "install",
                        "-q",
                        "--target",
                        f"{tmp}/pip",
                        "--only-binary=:all:",
                        "--python-version",
                        definitions.TARGET_PYTHON,
                        "--implementation",
                        "cp",
                        *platforms,
                        *definitions.ENVD_REQUIREMENTS,
                    ]
                )
            )
    row("envd-only layer build (median)", statistics.median(envd_only), statistics.median(pip_only))

    record_path = root / "code-interpreter-v1.json"
    if record_path.exists():
        n = 500
        started = time.perf_counter()
        for _ in range(n):
            load_template("code-interpreter-v1", root)
        load_us = (time.perf_counter() - started) / n * 1e6
        started = time.perf_counter()
        for _ in range(n):
            json.loads(record_path.read_text())
        json_us = (time.perf_counter() - started) / n * 1e6
        row("load_template('code-interpreter-v1')", load_us, json_us, "us")


if __name__ == "__main__":
    main()
