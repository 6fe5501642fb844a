"""`pmoves-e2b template build NAME -f e2b.Dockerfile`: the Dockerfile subset through the custom build
executor, checked in the built rootfs; unsupported instructions are refused with their line."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
from templates.template_cli import template_cli

from pmoves_e2b.config import SHARED_TEMPLATES_DIR
from pmoves_e2b.sandbox.templates.rootfs import run_in_layers
from pmoves_e2b.sandbox.templates.store import load_template


@pytest.fixture()
def templates(tmp_path: Path) -> Path:
    """A private templates dir on the shared build's layers (linked) and records (copied)."""
    shared = Path(os.environ.get("E2B_TEMPLATES_DIR") or SHARED_TEMPLATES_DIR)
    if os.geteuid() != 0 or not (shared / "base.json").is_file():
        pytest.skip("needs root and the built base template")
    own = tmp_path / "templates"
    (own / "layers").mkdir(parents=True)
    for layer in (shared / "layers").iterdir():
        if layer.is_dir() and not layer.name.startswith("."):
            (own / "layers" / layer.name).symlink_to(layer)
    (own / "base.json").write_text((shared / "base.json").read_text())
    return own


def test_a_dockerfile_builds_a_custom_template(templates: Path, tmp_path: Path) -> None:
    context = tmp_path / "ctx"
    (context / "app").mkdir(parents=True)
    (context / "app" / "main.py").write_text("print('hi')\n")
    marker = uuid.uuid4().hex
    (context / "e2b.Dockerfile").write_text(
        "# a comment\n"
        "ARG GREETING=hello\n"
        "FROM base\n"
        "ARG WHO\n"
        f"ENV MARKER={marker} \\\n"
        "    OTHER=two\n"
        'RUN echo "$GREETING $WHO $MARKER $(whoami) $(pwd)" > /opt/made.txt\n'
        "COPY --chown=user app /home/user/app\n"
        "WORKDIR /home/user/app\n"
        "USER user\n"
        'RUN ["sh", "-c", "id -un > by.txt"]\n'
    )
    name = f"df-{uuid.uuid4().hex[:8]}"
    result = template_cli(
        "build", f"{name}:v1", "-f", str(context / "e2b.Dockerfile"), "--build-arg", "WHO=world",
        "--templates-dir", str(templates),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ready" in result.stderr
    image = load_template(f"{name}:v1", templates)
    assert (image.user, image.workdir) == ("user", "/home/user/app")
    check = run_in_layers(
        "cat /opt/made.txt /home/user/app/by.txt; stat -c '%U %n' /home/user/app/main.py", image.layers
    )
    assert check.returncode == 0, check.stderr
    assert check.stdout.splitlines() == [f"hello world {marker} root /", "user", "user /home/user/app/main.py"]
    record = json.loads((templates / f"{name}.json").read_text())
    assert list(record["tags"]) == ["v1"]

    again = template_cli("build", f"{name}:v1", "-f", str(context / "e2b.Dockerfile"), "--build-arg", "WHO=world",
                "--templates-dir", str(templates))  # fmt: skip
    assert again.returncode == 0 and again.stderr.count("CACHED") == 3, again.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("FROM base\nCMD sleep 1\n", "line 2: CMD is not supported"),
        ("FROM base\nEXPOSE 80\n", "line 2: EXPOSE is not supported"),
        ("FROM base AS one\n", "no flags, no AS"),
        ("FROM base\nFROM base\n", "multi-stage"),
        ("RUN true\n", "line 1: RUN before FROM"),
        ("FROM base\nCOPY ../secret /x\n", "outside the build context"),
        ("FROM base\nCOPY --from=x a /b\n", "--from is not supported"),
        ("FROM base\nWORKDIR relative\n", "absolute path"),
        ("FROM base\nRUN echo $NOPE_ARG\nUSER $NOPE\n", "line 3: $NOPE is not defined"),
        ("FROM base\nCOPY missing.txt /x\n", "no such file"),
    ],
)
def test_unsupported_or_bad_dockerfiles_are_refused_with_their_line(
    templates: Path, tmp_path: Path, text: str, expected: str
) -> None:
    (tmp_path / "e2b.Dockerfile").write_text(text)
    before = sorted(p.name for p in (templates / "layers").iterdir())
    result = template_cli("build", "bad-one", "-f", str(tmp_path / "e2b.Dockerfile"), "--templates-dir", str(templates))
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in " ".join(result.stderr.split()), result.stderr
    assert sorted(p.name for p in (templates / "layers").iterdir()) == before
    assert not (templates / "bad-one.json").exists()
