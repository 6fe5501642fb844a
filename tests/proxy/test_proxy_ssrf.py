"""Whatever a client sends, the proxy connects only to the resolved sandbox address."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from proxy.proxy_harness import KNOWN_ID, ConnectionRecorder, SandboxNetns, raw_request
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect


@pytest.fixture()
def host_listener(sandbox_netns: SandboxNetns) -> Iterator[ConnectionRecorder]:
    """A host service on loopback and on the host end of the sandbox's veth."""
    recorder = ConnectionRecorder(["127.0.0.1", sandbox_netns.host_address])
    yield recorder
    recorder.close()


def attempts(port: int, netns: SandboxNetns) -> list[dict[str, str]]:
    return [
        # The port header naming a host port: the connection still goes to the sandbox.
        {"E2b-Sandbox-Id": KNOWN_ID, "E2b-Sandbox-Port": str(port)},
        {"Host": f"{port}-{KNOWN_ID}.e2b.localhost"},
        # Addresses smuggled into the id or port.
        {"E2b-Sandbox-Id": "127.0.0.1", "E2b-Sandbox-Port": str(port)},
        {"E2b-Sandbox-Id": netns.host_address, "E2b-Sandbox-Port": str(port)},
        {"E2b-Sandbox-Id": KNOWN_ID, "E2b-Sandbox-Port": f"127.0.0.1:{port}"},
        {"E2b-Sandbox-Id": KNOWN_ID, "E2b-Sandbox-Port": f"{port}@127.0.0.1"},
        {"Host": f"{port}-127.0.0.1.e2b.localhost"},
        {"Host": f"{port}-localhost.e2b.localhost"},
        # A resolver returning a loopback address (a bug) is refused too.
        {"E2b-Sandbox-Id": "sbxloopback", "E2b-Sandbox-Port": str(port)},
    ]


def test_no_request_reaches_host_services(
    client: httpx.Client, proxy_port: int, sandbox_netns: SandboxNetns, host_listener: ConnectionRecorder
) -> None:
    port = host_listener.port
    for headers in attempts(port, sandbox_netns):
        body = client.get("/", headers=headers).json()
        # Refused, or not a data-plane request at all (then the control plane answers).
        assert body.get("code") in (400, 502) or body.get("control"), (headers, body)
    # Absolute-form request targets do not pick the upstream either.
    for target in (f"http://127.0.0.1:{port}/", f"http://{sandbox_netns.host_address}:{port}/headers"):
        status, body = raw_request(proxy_port, "GET", target, {"Host": f"8080-{KNOWN_ID}.e2b.localhost"})
        assert status in (200, 404), body  # answered by the sandbox's own server
    assert host_listener.accepted == []
    # The listener does notice connections: a direct one shows up.
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    deadline = time.monotonic() + 5
    while not host_listener.accepted:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_no_websocket_reaches_host_services(
    proxy_port: int, sandbox_netns: SandboxNetns, host_listener: ConnectionRecorder
) -> None:
    for headers in attempts(host_listener.port, sandbox_netns):
        host = headers.pop("Host", f"127.0.0.1:{proxy_port}")
        sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
        with pytest.raises(InvalidStatus) as refused:
            connect(f"ws://{host}/", sock=sock, additional_headers=headers, proxy=None, open_timeout=10)
        status = refused.value.response.status_code
        assert status == 403 or json.loads(refused.value.response.body)["code"] in (400, 502)  # 403: control plane
    assert host_listener.accepted == []
