"""WebSocket upgrades are relayed to the sandbox (noVNC and other browser clients use them)."""

from __future__ import annotations

import json
import socket

import pytest
from proxy.proxy_harness import KNOWN_ID
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect


def open_ws(proxy_port: int, host: str, path: str = "/ws", **kwargs: object) -> ClientConnection:
    """Connect through the proxy's loopback port while presenting ``host`` (as a browser would)."""
    sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
    return connect(f"ws://{host}{path}", sock=sock, open_timeout=10, proxy=None, **kwargs)  # type: ignore[arg-type]


def test_websocket_echo_by_host(proxy_port: int) -> None:
    with open_ws(proxy_port, f"8080-{KNOWN_ID}.e2b.localhost:{proxy_port}", subprotocols=["binary"]) as ws:
        assert ws.subprotocol == "binary"  # the sandbox's choice reaches the client
        ws.send("hello")
        assert ws.recv(timeout=10) == "hello"
        frame = bytes(range(256)) * 4096
        ws.send(frame)
        assert ws.recv(timeout=10) == frame


def test_websocket_by_headers_passes_credentials(proxy_port: int) -> None:
    headers = {"E2b-Sandbox-Id": KNOWN_ID, "E2b-Sandbox-Port": "49983"}
    headers |= {"Authorization": "Bearer abc", "X-Access-Token": "tok"}
    origin = "http://localhost:6080"
    with open_ws(proxy_port, f"127.0.0.1:{proxy_port}", additional_headers=headers, origin=origin) as ws:
        ws.send("headers?")
        seen = json.loads(ws.recv(timeout=10))
    assert seen["authorization"] == "Bearer abc"
    assert seen["x-access-token"] == "tok"
    assert seen["origin"] == "http://localhost:6080"


def test_sandbox_close_code_reaches_the_client(proxy_port: int) -> None:
    with open_ws(proxy_port, f"8080-{KNOWN_ID}.e2b.localhost") as ws:
        ws.send("close-me")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001
    assert closed.value.rcvd.reason == "bye"


@pytest.mark.parametrize(
    ("host", "status", "text"),
    [
        ("8080-nosuchsandbox.e2b.localhost", 502, "was not found"),
        (f"3000-{KNOWN_ID}.e2b.localhost", 502, "port is not open"),
        (f"0-{KNOWN_ID}.e2b.localhost", 400, "expected an integer"),
    ],
)
def test_websocket_refusals_are_json(proxy_port: int, host: str, status: int, text: str) -> None:
    with pytest.raises(InvalidStatus) as refused:
        open_ws(proxy_port, host)
    response = refused.value.response
    assert response.status_code == status
    assert text in json.loads(response.body)["message"]


def test_sandbox_refusing_the_upgrade_is_shown_to_the_client(proxy_port: int) -> None:
    with pytest.raises(InvalidStatus) as refused:
        open_ws(proxy_port, f"8080-{KNOWN_ID}.e2b.localhost", path="/health")
    assert refused.value.response.status_code in (403, 404)  # the sandbox server's own answer
