"""run_code in each language. JavaScript/TypeScript and R kernels exist only in the template, so
those tests skip on a machine without the kernelspec (the template's own test runs them)."""

from __future__ import annotations

import pytest
from e2b import SandboxException
from e2b_code_interpreter import Context, Sandbox


def context_or_skip(sandbox: Sandbox, language: str) -> Context:
    try:
        return sandbox.create_code_context(language=language)
    except SandboxException as error:
        if "No kernel is installed" in str(error):
            pytest.skip(f"no {language} kernelspec installed here; the code-interpreter-v1 template test covers it")
        raise


def test_bash_runs_and_keeps_state(sandbox: Sandbox) -> None:
    first = sandbox.run_code("GREETING=hello; echo $((2 + 3))", language="bash")
    assert first.logs.stdout == ["5\n"]
    assert sandbox.run_code("echo $GREETING", language="bash").logs.stdout == ["hello\n"]


def test_bash_failure_is_an_error(sandbox: Sandbox) -> None:
    execution = sandbox.run_code("false", language="bash")
    assert execution.error is not None
    assert execution.error.value == "1"
    assert sandbox.run_code("echo still here", language="bash").logs.stdout == ["still here\n"]


def test_bash_context_has_its_own_cwd(sandbox: Sandbox, server) -> None:
    workdir = server.home / "bash-dir"
    workdir.mkdir(exist_ok=True)
    context = sandbox.create_code_context(language="bash", cwd=str(workdir))
    try:
        assert context.language == "bash"
        assert sandbox.run_code("pwd", context=context).logs.stdout == [f"{workdir}\n"]
    finally:
        sandbox.remove_code_context(context)


def test_bash_timeout_interrupts(sandbox: Sandbox) -> None:
    from e2b import TimeoutException

    sandbox.run_code("KEEP=yes", language="bash")
    with pytest.raises(TimeoutException):
        sandbox.run_code("sleep 60", language="bash", timeout=2)
    assert sandbox.run_code("echo $KEEP", language="bash", timeout=30).logs.stdout == ["yes\n"]


def test_javascript(sandbox: Sandbox) -> None:
    context = context_or_skip(sandbox, "javascript")
    try:
        sandbox.run_code("globalThis.counter = 20", context=context)
        execution = sandbox.run_code("console.log(counter + 1)", context=context)
        assert execution.logs.stdout == ["21\n"]
        assert sandbox.run_code("console.log(process?.env ? 'env' : 'no env')", language="js").error is None
    finally:
        sandbox.remove_code_context(context)


def test_typescript(sandbox: Sandbox) -> None:
    context = context_or_skip(sandbox, "typescript")
    try:
        execution = sandbox.run_code("const n: number = 6;\nconsole.log(n * 7)", context=context)
        assert execution.logs.stdout == ["42\n"]
    finally:
        sandbox.remove_code_context(context)


def test_r(sandbox: Sandbox) -> None:
    context = context_or_skip(sandbox, "r")
    try:
        assert sandbox.run_code("x <- 3", context=context).error is None
        assert sandbox.run_code("cat(x * 3)", context=context).logs.stdout == ["9"]
    finally:
        sandbox.remove_code_context(context)
