"""Code contexts through the stock SDK: each its own kernel, cwd and state."""

from __future__ import annotations

from pathlib import Path

import pytest
from e2b import NotFoundException, SandboxException
from e2b_code_interpreter import Sandbox

from interpreter.conftest import InterpreterServer


def test_context_has_its_own_cwd_and_state(sandbox: Sandbox, server: InterpreterServer) -> None:
    workdir = server.home / "project"
    workdir.mkdir(exist_ok=True)
    context = sandbox.create_code_context(cwd=str(workdir), language="python")
    try:
        assert context.language == "python"
        assert context.cwd == str(workdir)
        assert sandbox.run_code("import os; os.getcwd()", context=context).text == str(workdir)
        sandbox.run_code("only_here = 1", context=context)
        default = sandbox.run_code("'only_here' in globals()")
        assert default.text == "False", "contexts must not share variables"
        assert sandbox.run_code("only_here", context=context).text == "1"
    finally:
        sandbox.remove_code_context(context)


def test_default_context_starts_in_the_default_cwd(sandbox: Sandbox, server: InterpreterServer) -> None:
    context = sandbox.create_code_context()
    try:
        assert context.cwd == str(server.home)
        assert context.language == "python"
    finally:
        sandbox.remove_code_context(context.id)


def test_list_restart_and_remove(sandbox: Sandbox) -> None:
    context = sandbox.create_code_context()
    assert context.id in {c.id for c in sandbox.list_code_contexts()}

    sandbox.run_code("before_restart = True", context=context)
    sandbox.restart_code_context(context)
    lost = sandbox.run_code("before_restart", context=context)
    assert lost.error is not None and lost.error.name == "NameError", "restart must clear the state"
    assert sandbox.run_code("1 + 1", context=context).text == "2"

    sandbox.remove_code_context(context)
    assert context.id not in {c.id for c in sandbox.list_code_contexts()}
    with pytest.raises(NotFoundException):
        sandbox.run_code("1", context=context)
    with pytest.raises(NotFoundException):
        sandbox.restart_code_context(context)
    with pytest.raises(NotFoundException):
        sandbox.remove_code_context(context)


def test_restart_ends_a_running_cell(sandbox: Sandbox, server: InterpreterServer) -> None:
    import threading

    context = sandbox.create_code_context()
    try:
        outcome: dict[str, object] = {}
        started = threading.Event()

        def run() -> None:
            outcome["execution"] = sandbox.run_code(
                "print('go', flush=True)\nimport time\nwhile True: time.sleep(0.05)",
                context=context,
                on_stdout=lambda _m: started.set(),
                timeout=60,
            )

        worker = threading.Thread(target=run)
        worker.start()
        assert started.wait(30), "the cell never started"
        sandbox.restart_code_context(context)
        worker.join(30)
        assert not worker.is_alive()
        execution = outcome["execution"]
        assert execution.error is not None and execution.error.name == "ContextRestarting"
        assert sandbox.run_code("2 * 21", context=context).text == "42"
    finally:
        sandbox.remove_code_context(context)


def test_bad_context_requests_get_clear_errors(sandbox: Sandbox, server: InterpreterServer) -> None:
    with pytest.raises(SandboxException, match="No kernel is installed for language 'cobol'"):
        sandbox.create_code_context(language="cobol")
    with pytest.raises(SandboxException, match="not an existing directory"):
        sandbox.create_code_context(cwd=str(server.home / "missing"))
    with pytest.raises(SandboxException, match="No kernel is installed"):
        sandbox.run_code("x", language="cobol")


def test_file_written_in_a_context_lands_in_its_cwd(sandbox: Sandbox, server: InterpreterServer) -> None:
    workdir = server.home / "files"
    workdir.mkdir(exist_ok=True)
    context = sandbox.create_code_context(cwd=str(workdir))
    try:
        sandbox.run_code("open('out.txt', 'w').write('hi')", context=context)
        assert (Path(workdir) / "out.txt").read_text() == "hi"
    finally:
        sandbox.remove_code_context(context)


def test_default_contexts_start_with_the_server_and_others_on_first_use(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from e2b_code_interpreter import Sandbox as SDKSandbox

    from interpreter.conftest import start_server, stop_server

    server = start_server(tmp_path_factory.mktemp("defaults"), ["--default-languages", "bash"])
    try:
        sandbox = SDKSandbox.create(debug=True, sandbox_url=server.url, api_key="test-key")
        assert [c.language for c in sandbox.list_code_contexts()] == ["bash"]
        assert sandbox.run_code("1 + 1").text == "2"
        assert sorted(c.language for c in sandbox.list_code_contexts()) == ["bash", "python"]
    finally:
        stop_server(server)
