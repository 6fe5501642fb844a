"""Spell files: the built-ins load, user spells join or replace them, broken files are reported at load."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pmoves_e2b.spells.format import SpellFormatError, load_spell_file
from pmoves_e2b.spells.registry import BUILTIN_DIR, SpellRegistry, UnknownSpell

REQUIRED_BUILTINS = {
    "run-python",
    "run-shell",
    "profile-csv",
    "chart-csv",
    "convert-data",
    "sql-query",
    "fetch-page",
    "run-pytest",
    "lint-code",
    "markdown-pdf",
}

GOOD = """\
name: {name}
version: 1.2.0
description: Say hello to someone.
language: python
parameters:
  type: object
  required: [who]
  properties:
    who: {{type: string}}
example: {{who: world}}
code: |
  import spell
  print("hello", spell.params["who"])
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def test_builtins_load_without_problems_and_cover_the_promised_set():
    registry = SpellRegistry(None)
    assert registry.problems() == []
    names = {spell.name for spell in registry.spells()}
    assert REQUIRED_BUILTINS <= names
    for spell in registry.spells():
        assert spell.source == "builtin" and spell.example, spell.name
        assert spell.template == ("code-interpreter-v1" if spell.language == "python" else "base")


def test_user_spells_join_and_replace_builtins(tmp_path):
    write(tmp_path, "greet.yaml", GOOD.format(name="greet"))
    write(tmp_path, "run-python.yaml", GOOD.format(name="run-python"))
    registry = SpellRegistry(tmp_path)
    assert registry.get("greet").source == "user" and registry.get("greet").version == "1.2.0"
    assert registry.get("run-python").source == "user"
    assert registry.get("sql-query").source == "builtin"


def test_user_dir_is_reread_when_files_change(tmp_path):
    registry = SpellRegistry(tmp_path)
    with pytest.raises(UnknownSpell, match="no spell named 'greet'; known spells: .*run-python"):
        registry.get("greet")
    write(tmp_path, "greet.yaml", GOOD.format(name="greet"))
    assert registry.get("greet").name == "greet"
    (tmp_path / "greet.yaml").unlink()
    with pytest.raises(UnknownSpell):
        registry.get("greet")


@pytest.mark.parametrize(
    ("file_name", "text", "message"),
    [
        ("broken.yaml", "name: broken\n  version: [1\n", "not valid YAML (line"),
        ("listy.yaml", "- 1\n- 2\n", "must be a YAML mapping"),
        ("nolang.yaml", "name: nolang\nversion: '1.0'\ndescription: x\ncode: x\n", "'language' is a required property"),
        ("badname.yaml", GOOD.format(name="Bad_Name"), "name: 'Bad_Name' does not match"),
        ("other.yaml", GOOD.format(name="greet"), "must be named after the spell: greet.yaml"),
        (
            "badschema.yaml",
            GOOD.format(name="badschema").replace("{type: string}", "{type: strung}"),
            "parameters is not a valid JSON Schema",
        ),
        (
            "badexample.yaml",
            GOOD.format(name="badexample").replace("{who: world}", "{who: 3}"),
            "example does not match parameters: example.who: 3 is not of type 'string'",
        ),
        ("badpkg.yaml", GOOD.format(name="badpkg") + "requirements:\n  pip: ['x; rm -rf /']\n", "requirements.pip[0]"),
        ("extra.yaml", GOOD.format(name="extra") + "colour: red\n", "Additional properties are not allowed ('colour'"),
    ],
)
def test_invalid_spell_files_are_reported_at_load_with_file_and_field(tmp_path, file_name, text, message):
    path = write(tmp_path, file_name, text)
    with pytest.raises(SpellFormatError) as caught:
        load_spell_file(path, "user")
    assert str(path) in str(caught.value) and message in str(caught.value)
    registry = SpellRegistry(tmp_path)
    problems = registry.problems()
    assert [p.path for p in problems] == [str(path)] and message in problems[0].error
    assert REQUIRED_BUILTINS <= {s.name for s in registry.spells()}  # the rest still loads


def test_builtin_files_are_named_after_their_spells():
    for path in BUILTIN_DIR.glob("*.yaml"):
        assert load_spell_file(path).name == path.stem
