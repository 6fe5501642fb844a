"""`pmoves-e2b template ...` as a user calls it (a child process, a temp templates dir)."""

from __future__ import annotations

from pathlib import Path

from templates.template_cli import template_cli

from pmoves_e2b.sandbox.templates.definitions import TEMPLATES


def test_list_shows_unbuilt_templates(tmp_path: Path) -> None:
    result = template_cli("list", "--templates-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "base" in result.stdout and "code-interpreter-v1" in result.stdout and "desktop" in result.stdout
    assert result.stdout.count("not built") == len(TEMPLATES)


def test_build_of_an_unknown_template_fails_clearly(tmp_path: Path) -> None:
    result = template_cli("build", "no-such-template", "--templates-dir", str(tmp_path))
    assert result.returncode == 2
    assert "unknown template 'no-such-template'" in result.stderr
    assert "base" in result.stderr
    assert not (tmp_path / "layers").exists()


def test_build_needs_a_name_or_all(tmp_path: Path) -> None:
    result = template_cli("build", "--templates-dir", str(tmp_path))
    assert result.returncode == 2
    assert "--all" in result.stderr


def test_check_of_a_template_that_is_not_built_says_how_to_build_it(tmp_path: Path) -> None:
    result = template_cli("check", "base", "--templates-dir", str(tmp_path))
    assert result.returncode == 1
    assert "template build base" in " ".join(result.stderr.split())
