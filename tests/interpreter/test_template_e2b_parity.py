"""code-interpreter-v1 as E2B's code interpreter (issue 12 items 11-13), with the stock SDK in a real
sandbox: the Java kernel and its env vars, PIL images, and the data stack at E2B's versions."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest
from e2b_code_interpreter import Sandbox

from pmoves_e2b.sandbox.templates.definitions import DATA_PACKAGES

pytestmark = pytest.mark.stack

IMAGE = """
import numpy
from PIL import Image
image = Image.fromarray((numpy.random.rand(16, 16, 3) * 255).astype('uint8')).convert('RGBA')
"""


@pytest.fixture(scope="module")
def sbx(running_stack) -> Iterator[Sandbox]:  # type: ignore[no-untyped-def]
    box = Sandbox.create(
        api_key=running_stack.api_key,
        api_url=running_stack.sandbox_url,
        sandbox_url=running_stack.sandbox_url,
        timeout=600,
        envs={"SANDBOX_LEVEL": "from create", "OVERRIDDEN": "sandbox value"},
    )
    yield box
    box.kill()


def test_java_kernel_with_env_vars_at_all_three_levels(sbx: Sandbox) -> None:
    """As E2B's server does for Java: env vars become system properties (a JVM cannot set its env)."""
    first = sbx.run_code("int x = 6 * 7;\nSystem.out.println(x);", language="java", timeout=180)
    assert first.error is None, first.error
    assert first.logs.stdout == ["42", "\n"]  # println's text and line end: two messages, as E2B's kernel sends
    assert sbx.run_code('System.getProperty("SANDBOX_LEVEL")', language="java").text == "from create"
    call = sbx.run_code(
        'System.getProperty("OVERRIDDEN") + "/" + System.getProperty("CALL_ONLY")',
        language="java",
        envs={"OVERRIDDEN": "call value", "CALL_ONLY": 'a "quoted" \\ value'},
    )
    assert call.text == 'call value/a "quoted" \\ value'
    after = sbx.run_code(
        'System.getProperty("OVERRIDDEN") + "/" + System.getProperty("CALL_ONLY", "default")', language="java"
    )
    assert after.text == "sandbox value/default"  # back to the sandbox level, the call-only one gone
    assert sbx.run_code("x + 1", language="java").text == "43"  # state kept


def test_java_println_sends_its_text_then_the_line_end_like_e2b(sbx: Sandbox) -> None:
    """E2B's suite: run_code('System.out.println("Hello, World!")', language="java").logs.stdout[0] is the
    text alone (IJava on JDK 11 flushes println's text and its newline separately); print() streams as written."""
    execution = sbx.run_code(
        'System.out.println("Hello, World!");\nSystem.err.println("oops");\nSystem.out.print("a\\nb");',
        language="java",
        timeout=180,
    )
    assert execution.error is None, execution.error
    assert execution.logs.stdout == ["Hello, World!", "\n", "a\nb"]
    assert execution.logs.stderr == ["oops", "\n"]
    # The streams stay that way in later cells (JJava resets System.out before every cell).
    assert sbx.run_code('System.out.println("again")', language="java").logs.stdout == ["again", "\n"]


def test_java_context_and_errors(sbx: Sandbox) -> None:
    context = sbx.create_code_context(language="java", cwd="/tmp")
    assert sbx.run_code('System.getProperty("user.dir")', context=context).text == "/tmp"
    failed = sbx.run_code("undefinedName + 1", context=context)
    assert failed.error is not None
    assert "undefinedName" in failed.error.value + failed.error.traceback


@pytest.mark.parametrize("last_line", ["image.show()", "image", "image.save('/tmp/pil.png')"])
def test_pil_images_come_back_as_png(sbx: Sandbox, last_line: str) -> None:
    execution = sbx.run_code(IMAGE + last_line)
    assert execution.error is None, execution.error
    pngs = [result.png for result in execution.results if result.png]
    assert len(pngs) == 1
    assert base64.b64decode(pngs[0]).startswith(b"\x89PNG")
    # no desktop viewer was started: nothing from xdg-open lands in this cell or the next one
    assert execution.logs.stderr == []
    assert sbx.run_code("print('next')").logs.stderr == []
    if "save" in last_line:
        assert sbx.files.read("/tmp/pil.png", format="bytes").startswith(b"\x89PNG")


def test_matplotlib_boxplot_with_labels_gives_a_chart(sbx: Sandbox) -> None:
    """E2B's chart tests call boxplot(labels=...), which matplotlib 3.11 removed."""
    code = (
        "import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\n"
        "ax.boxplot([[85, 90, 78, 92, 88], [95, 89, 76, 91, 84, 87]], labels=['A', 'B'], patch_artist=True)\n"
        "plt.show()"
    )
    execution = sbx.run_code(code)
    assert execution.error is None, execution.error
    assert execution.results[0].chart is not None
    assert execution.results[0].chart.type == "box_and_whisker"


def test_data_stack_versions_are_the_pinned_ones(sbx: Sandbox) -> None:
    pins = dict(spec.split("==") for spec in DATA_PACKAGES.split())
    code = f"import importlib.metadata as m\n{{n: m.version(n) for n in {sorted(pins)!r}}}"
    execution = sbx.run_code(code)
    assert execution.error is None, execution.error
    assert execution.results[0].json == pins
