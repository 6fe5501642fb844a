"""Per-call env vars: set for that cell only, then restored."""

from __future__ import annotations

from e2b_code_interpreter import Sandbox


def test_env_vars_apply_to_one_cell_only(sandbox: Sandbox) -> None:
    read = "import os; os.environ.get('PMOVES_CELL_VAR', 'unset')"
    assert sandbox.run_code(read, envs={"PMOVES_CELL_VAR": "for this cell"}).text == "for this cell"
    assert sandbox.run_code(read).text == "unset"


def test_env_values_with_quotes_and_newlines_arrive_intact(sandbox: Sandbox) -> None:
    value = 'it\'s "quoted"\nand $(not run)'
    execution = sandbox.run_code("import os; print(os.environ['TRICKY'], end='')", envs={"TRICKY": value})
    assert "".join(execution.logs.stdout) == value


def test_env_vars_reach_subprocesses(sandbox: Sandbox) -> None:
    code = "import subprocess; print(subprocess.run(['sh', '-c', 'echo $CHILD_VAR'], capture_output=True, text=True).stdout, end='')"
    assert sandbox.run_code(code, envs={"CHILD_VAR": "inherited"}).logs.stdout == ["inherited\n"]


def test_env_vars_in_bash(sandbox: Sandbox) -> None:
    execution = sandbox.run_code('echo "$BASH_CELL_VAR"', language="bash", envs={"BASH_CELL_VAR": "a b"})
    assert execution.logs.stdout == ["a b\n"]
    assert sandbox.run_code('echo "[$BASH_CELL_VAR]"', language="bash").logs.stdout == ["[]\n"]
