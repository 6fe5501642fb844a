"""Every built-in spell through REST, MCP and NATS on the running stack, plus timeouts, injection,
requirement caching, fresh sandboxes and large files.

One code-interpreter sandbox serves the module (``sandbox_id`` in every request) so the 2-core CI
machine is not asked for thirty sandboxes; one test covers the default fresh-sandbox path.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import httpx
import httpx2
import nats
import pytest
from e2b import Sandbox
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from pmoves_e2b.events import envelope

pytestmark = pytest.mark.stack

RUN_TIMEOUT = 240.0
SITE_PORT = 8765
PAGE = (
    "<html><head><title>Spell page</title><script>var hidden = 1;</script></head><body>"
    "<h1>Hello spells</h1><p id='main'>Parameters are data.</p><a href='/next.html'>next page</a></body></html>"
)
CSV = "city,temp\nOslo,4\nRome,18\nCairo,30\n"


@pytest.fixture(scope="module")
def stack(running_stack: Any) -> Any:
    return running_stack


@pytest.fixture(scope="module")
def sandbox(stack: Any) -> Iterator[Sandbox]:
    """The module's sandbox, with a small web site on loopback for fetch-page."""
    box = Sandbox.create(
        template="code-interpreter-v1",
        timeout=1800,
        api_key=stack.api_key,
        api_url=stack.sandbox_url,
        sandbox_url=stack.sandbox_url,
    )
    try:
        box.files.write("/home/user/site/page.html", PAGE)
        box.commands.run(
            f"python3 -m http.server {SITE_PORT} --bind 127.0.0.1 --directory /home/user/site", background=True
        )
        box.commands.run(
            f"for i in $(seq 50); do curl -sf http://127.0.0.1:{SITE_PORT}/page.html >/dev/null && exit 0;"
            " sleep 0.1; done; exit 1",
            timeout=30,
        )
        yield box
    finally:
        box.kill()


# ---- the three execution paths -------------------------------------------------------------


def via_rest(stack: Any, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(
        f"{stack.mcp_url}/spell/execute",
        json=body,
        timeout=RUN_TIMEOUT,
        trust_env=False,
        headers={"Authorization": f"Bearer {stack.mcp_token}"},
    )
    assert response.status_code == 200, response.text
    return response.json()


def via_mcp(stack: Any, body: dict[str, Any]) -> dict[str, Any]:
    arguments = {"spell_name": body["spell_name"], "parameters": body["parameters"]}
    for key, name in (("sandbox_id", "sandbox_id"), ("timeout", "timeout_seconds")):
        if key in body:
            arguments[name] = body[key]

    async def call() -> dict[str, Any]:
        auth = {"Authorization": f"Bearer {stack.mcp_token}"}
        async with httpx2.AsyncClient(headers=auth, timeout=httpx2.Timeout(30, read=RUN_TIMEOUT)) as http:
            async with Client(streamable_http_client(stack.mcp_url + "/mcp", http_client=http)) as client:
                result = await client.call_tool("spell_run", arguments)
        run = dict(result.structured_content)
        assert result.is_error == (run["status"] != "completed")
        run["_images"] = [item for item in result.content if item.type == "image"]
        return run

    return anyio.run(call)


def via_nats(stack: Any, body: dict[str, Any]) -> dict[str, Any]:
    request_id = uuid.uuid4().hex

    async def call() -> Envelope:
        client = await nats.connect(stack.nats_url)
        try:
            message = envelope.build("e2b.spell.execute.v1", {**body, "request_id": request_id}, "tests")
            reply = await client.request("e2b.spell.execute.v1", message.to_bytes(), timeout=RUN_TIMEOUT)
        finally:
            await client.close()
        return envelope.parse(reply.data, "reply")

    answer = anyio.run(call)
    assert answer.correlation_id == request_id
    if answer.topic == "e2b.spell.completed.v1":
        return answer.payload
    assert answer.topic == "e2b.spell.failed.v1", answer
    return {**answer.payload["run"], "_failure": answer.payload}


Envelope = envelope.Envelope
PATHS: dict[str, Callable[[Any, dict[str, Any]], dict[str, Any]]] = {"rest": via_rest, "mcp": via_mcp, "nats": via_nats}


def file_bytes(run: dict[str, Any], name: str) -> bytes:
    [found] = [f for f in run["files"] if f["name"] == name]
    return base64.b64decode(found["content_base64"])


# ---- each built-in spell -------------------------------------------------------------------


def check_run_python(run: dict[str, Any]) -> None:
    assert run["stdout"] == "sum is 45\n" and run["result"] == {"total": 45}
    assert file_bytes(run, "note.txt") == b"written by a spell"


def check_run_shell(run: dict[str, Any]) -> None:
    assert run["stdout"].splitlines() == ["Linux", "hello"] and file_bytes(run, "hello.txt") == b"hello\n"


def check_profile_csv(run: dict[str, Any]) -> None:
    result = run["result"]
    assert (result["rows"], result["columns"]) == (3, 2)
    assert result["column_profiles"]["temp"]["mean"] == pytest.approx(52 / 3)
    assert result["column_profiles"]["city"]["unique"] == 3


def check_chart_csv(run: dict[str, Any]) -> None:
    assert file_bytes(run, "chart.png").startswith(b"\x89PNG")
    assert run["result"] == {"file": "chart.png", "series": ["temp"], "points": 3}
    if "_images" in run:  # MCP attaches the chart as image content
        assert [image.mime_type for image in run["_images"]] == ["image/png"]


def check_convert_data(run: dict[str, Any]) -> None:
    assert file_bytes(run, "converted.xlsx").startswith(b"PK")  # an xlsx is a zip
    assert run["result"]["rows"] == 3 and run["result"]["columns"] == ["city", "temp"]


def check_sql_query(run: dict[str, Any]) -> None:
    assert run["result"]["rows"] == [["Cairo", 30], ["Rome", 18]] and run["result"]["columns"] == ["city", "temp"]


def check_fetch_page(run: dict[str, Any]) -> None:
    result = run["result"]
    assert result["status"] == 200 and result["title"] == "Spell page"
    assert "Hello spells" in result["text"] and "hidden" not in result["text"]
    assert result["links"] == [{"text": "next page", "href": f"http://127.0.0.1:{SITE_PORT}/next.html"}]


def check_run_pytest(run: dict[str, Any]) -> None:
    result = run["result"]
    assert (result["total"], result["failures"], result["passed"]) == (2, 1, False)
    outcomes = {t["name"]: t["outcome"] for t in result["tests"]}
    assert outcomes == {"test_calc::test_add": "passed", "test_calc::test_wrong": "failed"}
    assert b"testsuite" in file_bytes(run, "junit.xml")


def check_lint_code(run: dict[str, Any]) -> None:
    codes = {d["code"] for d in run["result"]["diagnostics"]}
    assert "F401" in codes and run["result"]["code"].endswith("x = 1\n") and run["result"]["changed"]


def check_markdown_pdf(run: dict[str, Any]) -> None:
    assert file_bytes(run, "report.pdf").startswith(b"%PDF") and run["result"]["pages"] >= 1


SPELLS: dict[str, tuple[dict[str, Any], Callable[[dict[str, Any]], None]]] = {
    "run-python": (
        {
            "code": "total = sum(range(10))\nprint('sum is', total)\nresult = {'total': total}\n"
            "open(OUTPUT_DIR + '/note.txt', 'w').write('written by a spell')"
        },
        check_run_python,
    ),
    "run-shell": ({"command": 'uname -s; echo hello | tee "$OUTPUT_DIR/hello.txt"'}, check_run_shell),
    "profile-csv": ({"csv": CSV}, check_profile_csv),
    "chart-csv": ({"csv": CSV, "kind": "bar", "title": "Temperatures"}, check_chart_csv),
    "convert-data": ({"content": CSV, "from": "csv", "to": "excel"}, check_convert_data),
    "sql-query": (
        {"tables": {"weather": CSV}, "query": "SELECT city, temp FROM weather WHERE temp > 10 ORDER BY temp DESC"},
        check_sql_query,
    ),
    "fetch-page": ({"url": f"http://127.0.0.1:{SITE_PORT}/page.html"}, check_fetch_page),
    "run-pytest": (
        {
            "files": {
                "calc.py": "def add(a, b):\n    return a + b\n",
                "test_calc.py": "from calc import add\n\ndef test_add():\n    assert add(2, 3) == 5\n\n"
                "def test_wrong():\n    assert add(2, 2) == 5\n",
            }
        },
        check_run_pytest,
    ),
    "lint-code": ({"code": "import os\nx=1\n", "select": ["E", "F"]}, check_lint_code),
    "markdown-pdf": (
        {
            "markdown": "# Report\n\nTemperatures **rose** \u2014 see:\n\n| city | temp |\n|---|---|\n"
            "| Oslo | 4 |\n\n- one\n- two\n",
            "title": "Report",
        },
        check_markdown_pdf,
    ),
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("spell", list(SPELLS))
def test_builtin_spell(stack: Any, sandbox: Sandbox, spell: str, path: str) -> None:
    parameters, check = SPELLS[spell]
    run = PATHS[path](stack, {"spell_name": spell, "parameters": parameters, "sandbox_id": sandbox.sandbox_id})
    assert run["status"] == "completed", run
    assert run["spell_name"] == spell and run["sandbox_id"] == sandbox.sandbox_id and run["exit_code"] == 0
    check(run)


# ---- behaviour around the runs -------------------------------------------------------------


def test_spell_timeout_stops_the_run_and_is_reported(stack: Any, sandbox: Sandbox) -> None:
    body = {
        "spell_name": "run-python",
        "parameters": {"code": "import time\nprint('started', flush=True)\ntime.sleep(120)"},
        "timeout": 2,
        "sandbox_id": sandbox.sandbox_id,
    }
    started = time.monotonic()
    run = via_rest(stack, body)
    assert run["status"] == "timeout" and "did not finish within 2 s" in run["error"]
    assert run["stdout"] == "started\n" and time.monotonic() - started < 30
    leftover = sandbox.commands.run(f"ls -l /proc/[0-9]*/cwd 2>/dev/null | grep -c {run['run_id']} || true")
    assert leftover.stdout.strip() == "0"  # the spell's process was stopped

    failed = via_nats(stack, body)["_failure"]
    assert failed["code"] == "timeout" and failed["spell_name"] == "run-python"
    assert failed["run"]["status"] == "timeout"


def test_failing_spell_is_failed_with_its_output(stack: Any, sandbox: Sandbox) -> None:
    body = {
        "spell_name": "run-python",
        "parameters": {"code": "print('before')\nraise ValueError('bad input')"},
        "sandbox_id": sandbox.sandbox_id,
    }
    run = via_rest(stack, body)
    assert run["status"] == "failed" and run["exit_code"] == 1 and run["stdout"] == "before\n"
    assert "ValueError: bad input" in run["stderr"] and "ValueError: bad input" in run["error"]
    failed = via_nats(stack, body)["_failure"]
    assert failed["code"] == "execution_failed" and "ValueError: bad input" in failed["reason"]


def test_code_like_parameters_arrive_as_data(stack: Any, sandbox: Sandbox) -> None:
    spell_file = stack.data_dir / "spells" / "echo-param.yaml"
    spell_file.parent.mkdir(exist_ok=True)
    spell_file.write_text(
        "name: echo-param\nversion: 1.0.0\ndescription: Print a parameter back.\nlanguage: bash\n"
        "parameters:\n  type: object\n  required: [text]\n  properties:\n    text: {type: string}\n"
        "code: |\n  printf '%s' \"$SPELL_PARAM_TEXT\"\n"
        "  python3 -c 'import json, os; e = os.environ; "
        'print(json.load(open(e["SPELL_PARAMS"]))["text"] == e["SPELL_PARAM_TEXT"])\' >&2\n'
    )
    hostile = "$(touch /tmp/pwned) `touch /tmp/pwned`; touch /tmp/pwned \" ' {code} %s\n\\n"
    try:
        run = via_rest(
            stack, {"spell_name": "echo-param", "parameters": {"text": hostile}, "sandbox_id": sandbox.sandbox_id}
        )
    finally:
        spell_file.unlink()
    assert run["status"] == "completed", run
    assert run["stdout"] == hostile and run["stderr"] == "True\n"
    assert not sandbox.files.exists("/tmp/pwned")


def test_requirements_are_installed_once_per_sandbox(stack: Any, sandbox: Sandbox) -> None:
    body = {"spell_name": "lint-code", "parameters": {"code": "y=2\n"}, "sandbox_id": sandbox.sandbox_id}
    first = via_rest(stack, body)
    second = via_rest(stack, body)
    assert first["requirements"] in ("installed", "cached") and second["requirements"] == "cached"
    assert second["result"]["code"] == "y = 2\n"


def test_large_files_come_back_as_a_download_url(stack: Any, sandbox: Sandbox) -> None:
    code = "import os\nopen(os.path.join(OUTPUT_DIR, 'big.bin'), 'wb').write(bytes(range(256)) * 2400)"
    run = via_rest(stack, {"spell_name": "run-python", "parameters": {"code": code}, "sandbox_id": sandbox.sandbox_id})
    [big] = run["files"]
    assert big["size"] == 256 * 2400 and "content_base64" not in big and big["url"]
    # A plain client with the local CA, no credentials (curl resolves *.localhost to loopback itself).
    curl = ["curl", "-sS", "--fail", "--max-time", "30", "--cacert", str(stack.ca_bundle), big["url"]]
    fetched = subprocess.run(curl, capture_output=True, timeout=60)
    assert fetched.returncode == 0 and fetched.stdout == bytes(range(256)) * 2400, fetched.stderr


def test_without_sandbox_id_a_fresh_sandbox_is_made_and_removed(stack: Any) -> None:
    run = via_rest(stack, {"spell_name": "sql-query", "parameters": SPELLS["sql-query"][0]})
    assert run["status"] == "completed" and run["template"] == "code-interpreter-v1"
    check_sql_query(run)
    running = [s.sandbox_id for s in Sandbox.list(api_key=stack.api_key, api_url=stack.sandbox_url).next_items()]
    assert run["sandbox_id"] not in running


def test_bad_requests_over_nats_get_failed_with_the_field_named(stack: Any) -> None:
    async def ask(raw: bytes) -> Envelope:
        client = await nats.connect(stack.nats_url)
        try:
            return envelope.parse((await client.request("e2b.spell.execute.v1", raw, timeout=30)).data, "reply")
        finally:
            await client.close()

    flat = json.dumps({"request_id": "bad-1", "spell_name": "chart-csv", "parameters": {"csv": "a\n1", "kind": "pie"}})
    answer = asyncio.run(ask(flat.encode()))
    assert answer.topic == "e2b.spell.failed.v1" and answer.correlation_id == "bad-1"
    assert answer.payload["code"] == "invalid_parameters" and "parameters.kind: 'pie'" in answer.payload["reason"]
    answer = asyncio.run(ask(b"{not json"))
    assert answer.payload["code"] == "malformed_request"


def test_cli_lists_shows_and_runs_spells(stack: Any, sandbox: Sandbox, tmp_path: Any) -> None:
    listed = stack.cli("spell", "list")
    assert listed.returncode == 0 and "markdown-pdf" in listed.stdout
    shown = stack.cli("spell", "show", "chart-csv")
    assert shown.returncode == 0 and "matplotlib" in shown.stdout and '"scatter"' in shown.stdout
    csv = tmp_path / "weather.csv"
    csv.write_text(CSV)
    out = tmp_path / "out"
    ran = stack.cli(
        "spell",
        "run",
        "chart-csv",
        "--param",
        f"csv=@{csv}",
        "--param",
        "kind=bar",
        "--sandbox-id",
        sandbox.sandbox_id,
        "--out",
        str(out),
        timeout=RUN_TIMEOUT,
    )
    assert ran.returncode == 0, ran.stderr
    assert (out / "chart.png").read_bytes().startswith(b"\x89PNG") and "chart.png" in ran.stdout
    queried = stack.cli(
        "spell",
        "run",
        "sql-query",
        "--params-json",
        json.dumps({"tables": {"t": CSV}}),
        "--param",
        "query=select count(*) as n from t",
        "--json",
        "--sandbox-id",
        sandbox.sandbox_id,
        timeout=RUN_TIMEOUT,
    )
    assert queried.returncode == 0, queried.stderr
    assert json.loads(queried.stdout)["result"]["rows"] == [[3]]
    bad = stack.cli("spell", "run", "chart-csv", "--param", "csv=a", "--param", "kind=pie")
    assert bad.returncode == 1 and "parameters.kind: 'pie' is not one of" in bad.stderr
    unknown = stack.cli("spell", "show", "nope")
    assert unknown.returncode == 1 and "no spell named 'nope'" in unknown.stderr


def test_javascript_spell_reads_parameters_from_its_json_file(stack: Any, sandbox: Sandbox) -> None:
    spell_file = stack.data_dir / "spells" / "js-sum.yaml"
    spell_file.parent.mkdir(exist_ok=True)
    spell_file.write_text(
        "name: js-sum\nversion: 0.1.0\ndescription: Add numbers in Node.\nlanguage: javascript\n"
        "parameters:\n  type: object\n  required: [numbers]\n  properties:\n"
        "    numbers: {type: array, items: {type: number}}\n"
        "outputs:\n  result: {type: object, required: [sum]}\n"
        "code: |\n  const fs = require('fs');\n"
        "  const params = JSON.parse(fs.readFileSync(process.env.SPELL_PARAMS, 'utf8'));\n"
        "  const sum = params.numbers.reduce((a, b) => a + b, 0);\n"
        "  fs.writeFileSync(process.env.SPELL_RESULT, JSON.stringify({sum}));\n  console.log('sum', sum);\n"
    )
    try:
        run = via_rest(
            stack, {"spell_name": "js-sum", "parameters": {"numbers": [1, 2, 3.5]}, "sandbox_id": sandbox.sandbox_id}
        )
    finally:
        spell_file.unlink()
    assert run["status"] == "completed", run
    assert run["result"] == {"sum": 6.5} and run["stdout"] == "sum 6.5\n"


def test_npm_and_apt_requirements_are_installed(stack: Any, sandbox: Sandbox) -> None:
    spells = {
        "npm-check.yaml": "name: npm-check\nversion: 0.1.0\ndescription: Use an npm package.\nlanguage: javascript\n"
        "requirements:\n  npm: [is-number@7]\n"
        "code: |\n  const isNumber = require('is-number');\n  console.log(isNumber(5), isNumber('x'));\n",
        "apt-check.yaml": "name: apt-check\nversion: 0.1.0\ndescription: Use an apt package.\nlanguage: bash\n"
        "requirements:\n  apt: [jq]\n"
        "code: |\n  echo '{\"a\": 41}' | jq '.a + 1'\n",
    }
    directory = stack.data_dir / "spells"
    directory.mkdir(exist_ok=True)
    for name, text in spells.items():
        (directory / name).write_text(text)
    try:
        npm = via_rest(stack, {"spell_name": "npm-check", "parameters": {}, "sandbox_id": sandbox.sandbox_id})
        apt = via_rest(stack, {"spell_name": "apt-check", "parameters": {}, "sandbox_id": sandbox.sandbox_id})
    finally:
        for name in spells:
            (directory / name).unlink()
    assert (npm["status"], npm["stdout"], npm["requirements"]) == ("completed", "true false\n", "installed"), npm
    assert (apt["status"], apt["stdout"], apt["requirements"]) == ("completed", "42\n", "installed"), apt
