"""The async SDK (AsyncSandbox) against the same server."""

from __future__ import annotations

import pytest
from e2b_code_interpreter import AsyncSandbox

from interpreter.conftest import InterpreterServer


@pytest.fixture()
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_async_run_code_streams_and_returns_results(server: InterpreterServer) -> None:
    sandbox = await AsyncSandbox.create(debug=True, sandbox_url=server.url, api_key="test-key")
    lines: list[str] = []
    execution = await sandbox.run_code("print('async hello')\n6 * 7", on_stdout=lambda m: lines.append(m.line))
    assert lines == ["async hello\n"]
    assert execution.text == "42"
    context = await sandbox.create_code_context(language="bash")
    try:
        assert (await sandbox.run_code("echo $((1 + 1))", context=context)).logs.stdout == ["2\n"]
        assert context.id in {c.id for c in await sandbox.list_code_contexts()}
    finally:
        await sandbox.remove_code_context(context)
