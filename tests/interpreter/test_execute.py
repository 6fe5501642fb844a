"""run_code through the stock SDK: state, streamed output, errors and rich results."""

from __future__ import annotations

import base64
from pathlib import Path

from e2b_code_interpreter import Sandbox
from e2b_code_interpreter.charts import ChartType


def test_state_is_kept_across_cells(sandbox: Sandbox) -> None:
    sandbox.run_code("counter = 41")
    execution = sandbox.run_code("counter += 1\ncounter")
    assert execution.text == "42"
    assert execution.error is None
    later = sandbox.run_code("counter")
    assert later.text == "42"
    assert later.execution_count is not None and later.execution_count > execution.execution_count


def test_string_result_is_shown_without_quotes(sandbox: Sandbox) -> None:
    assert sandbox.run_code("'hello'").text == "hello"


def test_stdout_and_stderr_reach_the_callbacks_in_order(sandbox: Sandbox) -> None:
    events: list[tuple[str, str]] = []
    code = (
        "import sys\nprint('one', flush=True)\nprint('two', file=sys.stderr, flush=True)\nprint('three', flush=True)\n"
    )
    execution = sandbox.run_code(
        code,
        on_stdout=lambda m: events.append(("stdout", m.line)),
        on_stderr=lambda m: events.append(("stderr", m.line)),
    )
    assert events == [("stdout", "one\n"), ("stderr", "two\n"), ("stdout", "three\n")]
    assert execution.logs.stdout == ["one\n", "three\n"]
    assert execution.logs.stderr == ["two\n"]


def test_output_is_streamed_while_the_cell_runs(sandbox: Sandbox, tmp_path: Path) -> None:
    # The cell waits until the on_stdout callback has seen its first line: it only finishes with
    # "seen" if that line reached the client before the cell ended.
    flag = tmp_path / "seen"
    code = (
        "import os, time\n"
        "print('ready', flush=True)\n"
        "deadline = time.time() + 30\n"
        f"while not os.path.exists({str(flag)!r}) and time.time() < deadline:\n"
        "    time.sleep(0.01)\n"
        f"print('seen' if os.path.exists({str(flag)!r}) else 'not streamed')\n"
    )

    def on_stdout(message) -> None:
        if message.line == "ready\n":
            flag.touch()

    execution = sandbox.run_code(code, on_stdout=on_stdout)
    assert execution.logs.stdout == ["ready\n", "seen\n"]


def test_error_comes_back_with_name_value_and_plain_traceback(sandbox: Sandbox) -> None:
    errors = []
    execution = sandbox.run_code("def divide():\n    return 1 / 0\ndivide()", on_error=errors.append)
    error = execution.error
    assert error is not None
    assert error.name == "ZeroDivisionError"
    assert error.value == "division by zero"
    assert "divide()" in error.traceback and "return 1 / 0" in error.traceback
    assert "\x1b[" not in error.traceback, "tracebacks must carry no ANSI colours"
    assert errors and errors[0].name == "ZeroDivisionError"
    assert sandbox.run_code("1 + 1").text == "2", "the context keeps working after an error"


def test_matplotlib_figure_comes_back_as_png_and_chart(sandbox: Sandbox) -> None:
    code = (
        "import matplotlib.pyplot as plt\n"
        "fig, ax = plt.subplots()\n"
        "ax.plot([1, 2, 3], [10, 20, 15], label='sales')\n"
        "ax.set_title('Sales')\n"
        "ax.set_xlabel('day (d)')\n"
        "plt.show()\n"
    )
    execution = sandbox.run_code(code)
    assert execution.error is None, execution.error
    figures = [r for r in execution.results if r.png]
    assert len(figures) == 1
    figure = figures[0]
    assert base64.b64decode(figure.png).startswith(b"\x89PNG")
    assert figure.is_main_result is False
    chart = figure.chart
    assert chart is not None and chart.type == ChartType.LINE
    assert chart.title == "Sales"
    assert chart.x_unit == "d"
    assert [list(map(float, p)) for p in chart.elements[0].points] == [[1, 10], [2, 20], [3, 15]]


def test_bar_chart_keeps_labels_and_values(sandbox: Sandbox) -> None:
    code = "import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.bar(['a', 'b', 'c'], [3, 5, 2])\nplt.show()\n"
    chart = next(r.chart for r in sandbox.run_code(code).results if r.chart)
    assert chart.type == ChartType.BAR
    assert [(e.label, e.value) for e in chart.elements] == [("a", 3), ("b", 5), ("c", 2)]


def test_dataframe_comes_back_as_html_and_data(sandbox: Sandbox) -> None:
    execution = sandbox.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})")
    main = next(r for r in execution.results if r.is_main_result)
    assert main.html is not None and "<table" in main.html
    assert main.data == {"a": [1, 2], "b": ["x", "y"]}
    assert "a" in main.text


def test_several_displays_come_back_in_order(sandbox: Sandbox) -> None:
    code = (
        "from IPython.display import display, HTML, Markdown, Latex\n"
        "display(HTML('<b>bold</b>'))\n"
        "display(Markdown('# Title'))\n"
        "display({'application/vnd.custom+json': {'k': 1}, 'text/plain': 'custom'}, raw=True)\n"
        "display(Latex(r'$x^2$'))\n"
        "7 * 6\n"
    )
    results = sandbox.run_code(code).results
    assert [r.is_main_result for r in results] == [False, False, False, False, True]
    assert results[0].html == "<b>bold</b>"
    assert results[1].markdown == "# Title"
    assert results[2].extra == {"application/vnd.custom+json": {"k": 1}}
    assert results[3].latex == "$x^2$"
    assert results[4].text == "42"


def test_json_result_is_an_object(sandbox: Sandbox) -> None:
    code = "from IPython.display import JSON\nJSON({'a': [1, 2]})"
    main = next(r for r in sandbox.run_code(code).results if r.is_main_result)
    assert main.json == {"a": [1, 2]}


def test_explicit_python_language_runs_in_the_default_context(sandbox: Sandbox) -> None:
    sandbox.run_code("shared_value = 'default'")
    assert sandbox.run_code("shared_value", language="python").text == "default"


def test_dict_and_list_results_also_come_back_as_json(sandbox: Sandbox) -> None:
    main = next(r for r in sandbox.run_code("{'a': [1, 2], 'b': None}").results if r.is_main_result)
    assert main.json == {"a": [1, 2], "b": None}
    assert main.text == "{'a': [1, 2], 'b': None}"
    numpy_list = next(r for r in sandbox.run_code("import numpy as np\n[np.int64(3), np.arange(2)]").results)
    assert numpy_list.json == [3, [0, 1]]
    assert sandbox.run_code("{object(): 1}").results[0].json is None, "not JSON-able: text only"
