"""Timeouts, runaway output, bad requests and keepalives."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
import pytest
from e2b import TimeoutException
from e2b_code_interpreter import Sandbox

from interpreter.conftest import InterpreterServer, rss_bytes


def test_timeout_interrupts_the_cell_and_the_next_one_works(sandbox: Sandbox) -> None:
    sandbox.run_code("kept = 'state survives the interrupt'")
    with pytest.raises(TimeoutException):
        sandbox.run_code("while True: pass", timeout=2)
    execution = sandbox.run_code("kept", timeout=30)
    assert execution.error is None
    assert execution.text == "state survives the interrupt"


def test_infinite_print_loop_streams_until_the_timeout(sandbox: Sandbox) -> None:
    received = []
    with pytest.raises(TimeoutException):
        sandbox.run_code("while True: print('spam')", timeout=2, on_stdout=received.append)
    assert received, "the output must be streamed while the loop runs"
    assert sandbox.run_code("1 + 1", timeout=30).text == "2"


def test_a_client_that_stops_reading_does_not_grow_the_server(server: InterpreterServer, tmp_path: Path) -> None:
    # The cell prints 300 MB while the client reads nothing; the server must drop what does not
    # fit its buffer instead of holding it all, and tell the client what it missed.
    printed = tmp_path / "printed"
    code = f"for _ in range(300_000): print('x' * 1000)\nopen({str(printed)!r}, 'w').close()"
    body = json.dumps({"code": code, "context_id": None, "language": None, "env_vars": None}).encode()
    rss_before = rss_bytes(server.process.pid)
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as client:
        client.sendall(
            b"POST /execute HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        peak = rss_before
        deadline = time.monotonic() + 120
        while not printed.exists() and time.monotonic() < deadline:
            peak = max(peak, rss_bytes(server.process.pid))
            time.sleep(0.1)
        assert printed.exists(), "the cell did not finish printing"
        growth = peak - rss_before
        assert growth < 150 * 1024 * 1024, f"server grew by {growth} bytes while the client did not read"

        client.settimeout(60)
        received = bytearray()
        while b'{"type": "end_of_execution"}' not in received:
            chunk = client.recv(1 << 20)
            assert chunk, "the stream ended without end_of_execution"
            received += chunk
    assert len(received) < 64 * 1024 * 1024
    assert b"bytes of output were dropped" in received


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"not json", 400),
        (b"[1, 2]", 400),
        (b"{}", 422),
        (b'{"code": 1}', 422),
        (b'{"code": "1", "language": 5}', 422),
        (b'{"code": "1", "env_vars": ["A"]}', 422),
        (b'{"code": "1", "env_vars": {"A": 1}}', 422),
        (b'{"code": "1", "env_vars": {"A=B": "x"}}', 422),
        (b'{"code": "1", "context_id": "abc", "language": "python"}', 400),
        (b'{"code": "1", "context_id": "no-such-context"}', 404),
        (b'{"code": "1", "language": "no-such-language"}', 400),
        (b"\xff\xfe", 400),
    ],
)
def test_malformed_execute_bodies_get_4xx_json(server: InterpreterServer, body: bytes, status: int) -> None:
    response = httpx.post(f"{server.url}/execute", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    payload = response.json()
    assert payload["code"] == status and payload["message"]
    assert httpx.get(f"{server.url}/health").json() == "OK"


def test_malformed_context_bodies_get_4xx(server: InterpreterServer) -> None:
    assert httpx.post(f"{server.url}/contexts", content=b"{").status_code == 400
    assert httpx.post(f"{server.url}/contexts", json={"cwd": 3}).status_code == 422
    assert httpx.post(f"{server.url}/contexts", json={"language": ["python"]}).status_code == 422
    assert httpx.get(f"{server.url}/nothing-here").status_code == 404


def test_keepalive_lines_flow_while_the_cell_is_silent(server: InterpreterServer) -> None:
    body = {"code": "import time; time.sleep(1.6); 'done'", "context_id": None, "language": None, "env_vars": None}
    with httpx.stream("POST", f"{server.url}/execute", json=body, timeout=30) as response:
        assert response.headers["content-type"] == "application/x-ndjson"
        types = [json.loads(line)["type"] for line in response.iter_lines() if line]
    assert "keepalive" in types
    assert types[-1] == "end_of_execution"
    assert "result" in types


def test_health_is_ok(server: InterpreterServer) -> None:
    response = httpx.get(f"{server.url}/health")
    assert response.status_code == 200 and response.json() == "OK"


def test_a_kernel_that_dies_is_reported_and_replaced(sandbox: Sandbox) -> None:
    context = sandbox.create_code_context()
    try:
        sandbox.run_code("lost = True", context=context)
        died = sandbox.run_code("import os; os._exit(1)", context=context, timeout=60)
        assert died.error is not None and died.error.name == "UnexpectedEndOfExecution"
        after = sandbox.run_code("'lost' in globals()", context=context, timeout=60)
        assert after.text == "False", "a fresh kernel replaces the dead one"
    finally:
        sandbox.remove_code_context(context)
