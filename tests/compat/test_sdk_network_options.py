"""The stock `e2b` SDK (2.63.0): network options that are enforced, and options that are refused.

Issue 12 items 2 and 3: ``allowPublicTraffic: false`` must really close a sandbox's ports to callers
without its traffic token, ``maskRequestHost`` must reach the sandbox's server, and every option we
cannot honour (or route we do not have) must be an error the SDK shows, never a silent no-op.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
from e2b import Sandbox
from e2b.exceptions import SandboxException, SandboxNotFoundException

from pmoves_e2b.sandbox.tls import ensure_tls

pytestmark = pytest.mark.stack

# A server in the sandbox that answers with the raw request line and headers it received.
ECHO_SERVER = r"""
import http.server, json, time
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/slow":
            time.sleep(4)
        body = json.dumps({"headers": [[k, v] for k, v in self.headers.items()]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8000), H).serve_forever()
"""


def _start_echo(sbx: Sandbox) -> None:
    sbx.files.write("/tmp/echo.py", ECHO_SERVER)
    sbx.commands.run("python3 /tmp/echo.py", background=True)


def _get(
    sdk_env: dict[str, str], sandbox_id: str, headers: dict[str, str] | None = None, path: str = "/probe"
) -> httpx.Response:
    """A request to port 8000 through the proxy, addressed like the SDK does (E2b-Sandbox-* headers)."""
    base = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": "8000"}
    deadline = time.monotonic() + 20
    while True:
        response = httpx.get(sdk_env["E2B_SANDBOX_URL"] + path, headers={**base, **(headers or {})}, timeout=15)
        if "port is not open" not in response.text or time.monotonic() > deadline:
            return response
        time.sleep(0.2)


def test_private_traffic_needs_the_token_and_the_masked_host_reaches_the_server(sdk_env: dict[str, str]) -> None:
    sbx = Sandbox.create(
        timeout=120, network={"allow_public_traffic": False, "mask_request_host": "${PORT}-masked.example.test"}
    )
    try:
        token = sbx.traffic_access_token
        assert token, "a sandbox with allowPublicTraffic=false gets a trafficAccessToken"
        _start_echo(sbx)  # envd (commands, files) keeps working: it has its own access token
        refused = _get(sdk_env, sbx.sandbox_id)
        assert refused.status_code == 403, refused.text
        assert "e2b-traffic-access-token" in refused.json()["message"]
        assert _get(sdk_env, sbx.sandbox_id, {"e2b-traffic-access-token": token + "x"}).status_code == 403
        served = _get(sdk_env, sbx.sandbox_id, {"e2b-traffic-access-token": token, "x-custom-thing": "1"})
        assert served.status_code == 200, served.text
        seen = dict(served.json()["headers"])
        assert seen["Host"] == "8000-masked.example.test"
        assert seen["X-Custom-Thing"] == "1"  # canonical case, as E2B's proxy delivers names
        assert len(served.headers.get_list("date")) == 1
        info = sbx.get_info()
        assert info.network is not None and info.network.get("allow_public_traffic") is False
    finally:
        sbx.kill()


def test_public_sandboxes_need_no_traffic_token(sdk_env: dict[str, str]) -> None:
    sbx = Sandbox.create(timeout=120)
    try:
        assert sbx.traffic_access_token is None
        _start_echo(sbx)
        served = _get(sdk_env, sbx.sandbox_id)
        assert served.status_code == 200, served.text
        assert len(served.headers.get_list("date")) == 1
        assert "E2b-Sandbox-Id" in dict(served.json()["headers"])
    finally:
        sbx.kill()


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"network": {"allow_out": ["not a host!"]}}, "not an IPv4 address, CIDR range or domain name"),
        ({"network": {"deny_out": ["2001:db8::/32"]}}, "IPv6"),
        ({"network": {"allow_out": ["a.example.test"], "dns_servers": ["dns.example.test"]}}, "network.dnsServers"),
        ({"network": {"egress_proxy": {"address": "proxy.example.test:1080"}}}, "network.egressProxy"),
        ({"network": {"https_ports": [0]}}, "port numbers"),
        ({"volume_mounts": {"/data": "vol-1"}}, "volumeMounts"),
        ({"allow_internet_access": False, "network": {"allow_out": ["198.51.100.7"]}}, "without internet access"),
    ],
)
def test_unsupported_options_are_errors_the_sdk_shows(sdk_env: dict[str, str], options: dict, named: str) -> None:
    with pytest.raises(SandboxException) as caught:
        Sandbox.create(timeout=30, **options).kill()
    assert named in str(caught.value)
    assert "400" in str(caught.value)


def test_unknown_network_fields_are_refused(sdk_env: dict[str, str]) -> None:
    body = {"templateID": "base", "network": {"allowOut": [], "denyOutt": ["0.0.0.0/0"]}}
    headers = {"X-API-Key": sdk_env["E2B_API_KEY"]}
    response = httpx.post(sdk_env["E2B_API_URL"] + "/sandboxes", json=body, headers=headers, timeout=30)
    assert response.status_code == 400
    assert "network.denyOutt" in response.json()["message"]


def test_auto_resume_in_the_shape_older_sdks_send(sdk_env: dict[str, str]) -> None:
    body = {"templateID": "base", "timeout": 60, "autoResume": {"policy": "any"}}
    headers = {"X-API-Key": sdk_env["E2B_API_KEY"]}
    created = httpx.post(sdk_env["E2B_API_URL"] + "/sandboxes", json=body, headers=headers, timeout=60)
    assert created.status_code == 201, created.text
    sandbox_id = created.json()["sandboxID"]
    try:
        info = Sandbox.get_info(sandbox_id)
        assert info.lifecycle is not None and info.lifecycle["auto_resume"] is True
    finally:
        Sandbox.kill(sandbox_id)


def test_update_network_is_validated(sdk_env: dict[str, str]) -> None:
    sbx = Sandbox.create(timeout=60)
    try:
        sbx.update_network({"deny_out": ["198.51.100.0/24"], "allow_out": ["198.51.100.7"]})
        info = sbx.get_info()
        assert info.network is not None
        assert info.network["deny_out"] == ["198.51.100.0/24"]
        assert info.network["allow_out"] == ["198.51.100.7/32"]
        with pytest.raises(SandboxException) as caught:
            sbx.update_network({"allow_out": ["198.51.100.7"], "allow_internet_access": False})
        assert "without internet access" in str(caught.value)
        sbx.update_network({})  # omitted fields clear the rules
        info = sbx.get_info()
        assert info.network is not None and info.network.get("deny_out", []) == []
        with pytest.raises(SandboxException) as caught:
            sbx.update_network({"allow_out": ["bad_host name"]})
        assert "not an IPv4 address, CIDR range or domain name" in str(caught.value)
        with pytest.raises(SandboxNotFoundException):
            Sandbox.update_network("nosuchsandbox0000", {})  # type: ignore[call-arg]
    finally:
        sbx.kill()


def test_auto_resume_wakes_a_paused_sandbox_on_traffic(sdk_env: dict[str, str]) -> None:
    """Issue 12 item 4: lifecycle.autoResume: a request through the proxy resumes and is served."""
    sbx = Sandbox.create(timeout=120, lifecycle={"on_timeout": "pause", "auto_resume": True})
    try:
        assert sbx.get_info().lifecycle == {"auto_resume": True, "on_timeout": "pause"}
        _start_echo(sbx)
        assert _get(sdk_env, sbx.sandbox_id).status_code == 200
        sbx.pause()
        assert sbx.get_info().state.value == "paused"
        served = _get(sdk_env, sbx.sandbox_id)
        assert served.status_code == 200, served.text
        assert sbx.get_info().state.value == "running"
    finally:
        sbx.kill()


def test_without_auto_resume_a_paused_sandbox_stays_paused(sdk_env: dict[str, str]) -> None:
    sbx = Sandbox.create(timeout=120, lifecycle={"on_timeout": "pause"})
    try:
        _start_echo(sbx)
        assert _get(sdk_env, sbx.sandbox_id).status_code == 200
        sbx.pause()
        refused = _get(sdk_env, sbx.sandbox_id)
        assert refused.status_code == 502 and "was not found" in refused.text
        assert sbx.get_info().state.value == "paused"
    finally:
        sbx.kill()


def test_a_request_in_flight_fails_at_once_when_the_sandbox_is_paused(sdk_env: dict[str, str]) -> None:
    """Issue 12 item 5: not a hang until the client's timeout, but a clear error right away."""
    sbx = Sandbox.create(timeout=120)
    try:
        _start_echo(sbx)
        assert _get(sdk_env, sbx.sandbox_id).status_code == 200
        result: dict[str, object] = {}

        def slow_request() -> None:
            started = time.monotonic()
            result["response"] = _get(sdk_env, sbx.sandbox_id, path="/slow")
            result["seconds"] = time.monotonic() - started

        thread = threading.Thread(target=slow_request)
        thread.start()
        time.sleep(1)
        sbx.pause()
        thread.join(timeout=20)
        response = result["response"]
        assert isinstance(response, httpx.Response)
        assert response.status_code == 502
        assert "paused while this request was in flight" in response.json()["message"]
        assert float(result["seconds"]) < 4  # the sandbox's answer would take 4 s; the pause cut it short
    finally:
        sbx.kill()


HTTPS_SERVER = r"""
import http.server, ssl
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "13")
        self.end_headers()
        self.wfile.write(b"https backend")
    def log_message(self, *a): pass
server = http.server.ThreadingHTTPServer(("0.0.0.0", 8000), H)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain("/tmp/cert.pem", "/tmp/key.pem")
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"""


def test_https_ports_reach_a_tls_server_in_the_sandbox(sdk_env: dict[str, str], tmp_path: Path) -> None:
    sbx = Sandbox.create(timeout=120, network={"https_ports": [8000]})
    try:
        tls = ensure_tls(tmp_path)  # any certificate: the proxy does not verify a sandbox's own
        sbx.files.write("/tmp/cert.pem", tls.cert.read_text())
        sbx.files.write("/tmp/key.pem", tls.key.read_text())
        sbx.files.write("/tmp/https.py", HTTPS_SERVER)
        sbx.commands.run("python3 /tmp/https.py", background=True)
        served = _get(sdk_env, sbx.sandbox_id)
        assert served.status_code == 200, served.text
        assert served.text == "https backend"
        info = sbx.get_info()
        assert info.network is not None and info.network.get("https_ports") == [8000]
    finally:
        sbx.kill()


def test_unknown_create_fields_and_memoryless_resume_are_refused(sdk_env: dict[str, str]) -> None:
    headers = {"X-API-Key": sdk_env["E2B_API_KEY"]}
    body = {"templateID": "base", "timeout": 60, "gpuCount": 1}
    response = httpx.post(sdk_env["E2B_API_URL"] + "/v2/sandboxes", json=body, headers=headers, timeout=30)
    assert response.status_code == 400
    assert response.json()["message"] == "unknown field 'gpuCount' is not supported by this server"
    sbx = Sandbox.create(timeout=60)
    try:
        assert sbx.pause() is True
        with pytest.raises(SandboxException) as caught:
            Sandbox.connect(sbx.sandbox_id, on_resume="reboot")  # type: ignore[call-arg]
        assert "without memory" in str(caught.value)
    finally:
        sbx.kill()


WS_SERVER = r"""
import base64, hashlib, socket, threading
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
def serve(conn):
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(4096)
    key = [l.split(b":", 1)[1].strip() for l in data.split(b"\r\n") if l.lower().startswith(b"sec-websocket-key")][0]
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n\x81\x05ready")
    while conn.recv(4096):
        pass
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", 8001))
server.listen()
while True:
    threading.Thread(target=serve, args=(server.accept()[0],), daemon=True).start()
"""


def test_a_websocket_is_closed_at_once_when_the_sandbox_is_paused(sdk_env: dict[str, str]) -> None:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    sbx = Sandbox.create(timeout=120)
    try:
        sbx.files.write("/tmp/ws.py", WS_SERVER)
        sbx.commands.run("python3 /tmp/ws.py", background=True)
        url = sdk_env["E2B_SANDBOX_URL"].replace("http://", "ws://") + "/"
        headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "8001"}
        deadline = time.monotonic() + 20
        while True:
            try:
                ws = connect(url, additional_headers=headers, open_timeout=5)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        with ws:
            assert ws.recv(timeout=5) == "ready"
            sbx.pause()
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=5)  # without the fix: TimeoutError, the frozen server never answers
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
            assert closed.value.rcvd.reason == "The sandbox was paused"
    finally:
        sbx.kill()
