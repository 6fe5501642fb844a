"""The code-interpreter-v1 template on the whole stack: the server inside a real sandbox, as user
``user``, with every kernel the template installs, reached by the stock SDK through our proxy."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest
from e2b import TimeoutException
from e2b_code_interpreter import Sandbox

pytestmark = pytest.mark.stack


def create(running_stack, **kwargs) -> Sandbox:  # type: ignore[no-untyped-def]
    return Sandbox.create(
        api_key=running_stack.api_key,
        api_url=running_stack.sandbox_url,
        sandbox_url=running_stack.sandbox_url,
        timeout=600,
        **kwargs,
    )


@pytest.fixture(scope="module")
def sbx(running_stack) -> Iterator[Sandbox]:  # type: ignore[no-untyped-def]
    box = create(running_stack, envs={"SANDBOX_LEVEL": "from create", "OVERRIDDEN": "sandbox value"})
    yield box
    box.kill()


def test_kernels_run_as_root_in_the_users_home_and_commands_as_user(sbx: Sandbox) -> None:
    """Issue 12 item 10: as in E2B's template, kernels are root (so %pip installs into the
    environment and cwd="/root" contexts work) while commands keep running as `user`."""
    execution = sbx.run_code("import os, getpass\nprint(getpass.getuser(), os.getcwd())\n40 + 2")
    assert execution.logs.stdout == ["root /home/user\n"]
    assert execution.text == "42"
    assert sbx.commands.run("whoami").stdout.strip() == "user"
    in_root = sbx.create_code_context(cwd="/root")
    assert sbx.run_code("import os; os.getcwd()", context=in_root).text == "/root"
    # the environment is writable by the kernel, as %pip needs
    assert sbx.run_code("import os, sys; os.access(sys.prefix + '/lib', os.W_OK)").text == "True"


@pytest.mark.parametrize(
    ("language", "code", "expected_stdout"),
    [
        ("javascript", "console.log(6 * 7)", ["42\n"]),
        ("js", "const fruits: string[] = ['a', 'b'];\nconsole.log(fruits.length * 21)", ["42\n"]),
        ("typescript", "const n: number = 6;\nconsole.log(n * 7)", ["42\n"]),
        ("bash", "echo $((6 * 7))", ["42\n"]),
        ("r", "cat(6 * 7)", ["42"]),
    ],
)
def test_each_language_runs(sbx: Sandbox, language: str, code: str, expected_stdout: list[str]) -> None:
    execution = sbx.run_code(code, language=language, timeout=120)
    assert execution.error is None, execution.error
    assert execution.logs.stdout == expected_stdout


def test_state_is_kept_per_language(sbx: Sandbox) -> None:
    sbx.run_code("globalThis.kept = 41", language="js")
    assert sbx.run_code("kept + 1", language="js").text == "42"
    sbx.run_code("kept <- 41", language="r")
    assert sbx.run_code("cat(kept + 1)", language="r").logs.stdout == ["42"]


def test_matplotlib_chart_inside_the_sandbox(sbx: Sandbox) -> None:
    code = "import matplotlib.pyplot as plt\nplt.bar(['x', 'y'], [1, 2])\nplt.show()"
    figure = next(r for r in sbx.run_code(code, timeout=120).results if r.png)
    assert base64.b64decode(figure.png).startswith(b"\x89PNG")
    assert figure.chart is not None and [e.value for e in figure.chart.elements] == [1, 2]


def test_env_vars_at_sandbox_and_call_level(sbx: Sandbox) -> None:
    read = "import os; os.environ.get('{}', 'unset')"
    assert sbx.run_code(read.format("SANDBOX_LEVEL")).text == "from create"
    assert sbx.run_code(read.format("OVERRIDDEN"), envs={"OVERRIDDEN": "call"}).text == "call"
    assert sbx.run_code(read.format("OVERRIDDEN")).text == "sandbox value"
    assert sbx.run_code("echo $SANDBOX_LEVEL", language="bash").logs.stdout == ["from create\n"]
    assert sbx.run_code("Deno.env.get('SANDBOX_LEVEL')", language="js").text == "from create"
    js_call = sbx.run_code("Deno.env.get('OVERRIDDEN')", language="js", envs={"OVERRIDDEN": "js call"})
    assert js_call.text == "js call"
    assert sbx.run_code("Deno.env.get('OVERRIDDEN')", language="js").text == "sandbox value"
    r_call = sbx.run_code("cat(Sys.getenv('OVERRIDDEN'))", language="r", envs={"OVERRIDDEN": "r call"})
    assert r_call.logs.stdout == ["r call"]
    assert sbx.run_code("cat(Sys.getenv('OVERRIDDEN'))", language="r").logs.stdout == ["sandbox value"]


def test_javascript_timeout_interrupts_and_keeps_state(sbx: Sandbox) -> None:
    sbx.run_code("globalThis.survivor = 'still here'", language="js")
    with pytest.raises(TimeoutException):
        sbx.run_code("while (true) {}", language="js", timeout=3)
    assert sbx.run_code("survivor", language="js", timeout=60).text == "still here"


def test_two_sandboxes_do_not_share_state(running_stack, sbx: Sandbox) -> None:  # type: ignore[no-untyped-def]
    sbx.run_code("secret = 'only in the first sandbox'")
    sbx.files.write("/home/user/.only-first", "x")
    other = create(running_stack)
    try:
        execution = other.run_code("'secret' in globals()")
        assert execution.text == "False"
        assert other.run_code("import os; os.path.exists('/home/user/.only-first')").text == "False"
    finally:
        other.kill()


def test_code_runs_only_with_the_sandboxs_access_token(running_stack, sbx: Sandbox) -> None:  # type: ignore[no-untyped-def]
    """Issue 11 finding 2: through the proxy, /execute ran code with no or a wrong X-Access-Token."""
    import httpx

    url = f"{running_stack.sandbox_url}/execute"
    body = {"code": "open('/tmp/pwned', 'w').write('x')", "context_id": None, "language": None, "env_vars": None}
    route = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49999"}
    for token in ({}, {"X-Access-Token": "wrong"}):
        response = httpx.post(url, json=body, headers={**route, **token}, timeout=60, trust_env=False)
        assert response.status_code == 401, (token, response.status_code, response.text)
    wrong = {**route, "X-Access-Token": "wrong"}
    assert (
        httpx.get(f"{running_stack.sandbox_url}/contexts", headers=wrong, timeout=60, trust_env=False).status_code
        == 401
    )
    assert not sbx.files.exists("/tmp/pwned")
    assert sbx.run_code("6 * 7").text == "42"  # the stock SDK sends the token
    context = sbx.create_code_context()  # the SDK sends no token on context routes
    assert any(c.id == context.id for c in sbx.list_code_contexts())
