"""Parameters: checked against the spell's schema before anything runs, and passed to the code as data only."""

from __future__ import annotations

import json

import pytest

from pmoves_e2b.sdk.config import build_sdk_config
from pmoves_e2b.spells.executor import SpellError, SpellExecutor, SpellRequest, prepare
from pmoves_e2b.spells.registry import SpellRegistry

# A backend that does not exist: resolving a request must fail before any sandbox call.
UNREACHABLE = build_sdk_config("http://127.0.0.1:9", "e2b_unused")
HOSTILE = [
    '"; import os; os.system("touch /tmp/pwned") #',
    "$(touch /tmp/pwned) `touch /tmp/pwned` ' \" \\",
    "{code}\n__import__('os').system('id')",
]


@pytest.fixture(scope="module")
def executor() -> SpellExecutor:
    return SpellExecutor(SpellRegistry(None), UNREACHABLE, max_timeout=300)


@pytest.mark.parametrize(
    ("spell", "parameters", "message"),
    [
        ("sql-query", {"query": "select 1"}, "parameters: 'tables' is a required property"),
        (
            "sql-query",
            {"tables": {"bad name": "a\n1"}, "query": "select 1"},
            "parameters.tables: 'bad name' does not match",
        ),
        ("chart-csv", {"csv": "a,b\n1,2", "kind": "pie"}, "parameters.kind: 'pie' is not one of"),
        ("profile-csv", {"csv": "a\n1", "top": 0}, "parameters.top: 0 is less than the minimum of 1"),
        ("run-pytest", {"files": {"../escape.py": "x"}}, "parameters.files: '../escape.py' does not match"),
        ("fetch-page", {"url": "file:///etc/passwd"}, "parameters.url: 'file:///etc/passwd' does not match"),
        ("run-python", {"code": "print(1)", "colour": "red"}, "Additional properties are not allowed ('colour'"),
    ],
)
def test_bad_parameters_are_rejected_naming_the_field(executor, spell, parameters, message):
    with pytest.raises(SpellError) as caught:
        executor.resolve(SpellRequest(spell, parameters))
    assert caught.value.code == "invalid_parameters" and caught.value.status == 422
    assert f"spell {spell}: " in caught.value.message and message in caught.value.message


def test_unknown_spell_and_bad_timeout_are_clear(executor):
    with pytest.raises(SpellError, match="no spell named 'nope'; known spells: chart-csv") as caught:
        executor.resolve(SpellRequest("nope"))
    assert caught.value.status == 404
    with pytest.raises(SpellError, match="timeout must be between 1 and 300 seconds") as caught:
        executor.resolve(SpellRequest("run-python", {"code": "1"}, timeout=301))
    assert caught.value.code == "invalid_request"


def test_defaults_fill_in_and_the_spell_timeout_applies(executor):
    spell, parameters, timeout = executor.resolve(SpellRequest("profile-csv", {"csv": "a\n1"}))
    assert parameters == {"csv": "a\n1", "delimiter": ",", "top": 5}
    assert timeout == spell.timeout


@pytest.mark.parametrize("text", HOSTILE)
def test_code_like_parameters_reach_the_code_only_as_data(executor, text):
    for name, parameters in (
        ("run-shell", {"command": text}),
        ("profile-csv", {"csv": text}),
        ("sql-query", {"tables": {"t": "a\n1"}, "query": text}),
    ):
        spell, checked, timeout = executor.resolve(SpellRequest(name, parameters))
        plan = prepare(spell, checked, timeout)
        # Not in the command line, not in any uploaded program: only in params.json and env values.
        assert text not in plan.command
        for path, data in plan.uploads.items():
            if not path.endswith("/params.json"):
                assert text.encode() not in data, path
        assert json.loads(plan.uploads[f"{plan.run_dir}/params.json"]) == checked
        assert plan.command == f"cd {plan.run_dir} && exec " + plan.command.split(" && exec ", 1)[1]
        assert plan.run_dir.startswith("/tmp/spells/") and plan.run_dir.rsplit("/", 1)[1].isalnum()
        assert (
            plan.uploads[f"{plan.run_dir}/{'main.sh' if spell.language == 'bash' else 'main.py'}"]
            == spell.code.encode()
        )


def test_requirements_install_is_cached_per_requirement_set(executor):
    lint = executor.registry.get("lint-code")
    plan = prepare(lint, {"code": "x"}, 10)
    assert plan.install_command is not None and "pip install" in plan.install_command and "ruff" in plan.install_command
    assert "if [ -f /var/cache/pmoves-spells/" in plan.install_command and "flock" in plan.install_command
    assert prepare(executor.registry.get("sql-query"), {}, 10).install_command is None
