"""Which requests the proxy takes, where it sends them, and the errors the E2B SDK keys on."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from proxy.proxy_harness import KNOWN_ID, SandboxNetns, host_for, raw_request, via_headers

from pmoves_e2b.sandbox.proxy import wait_port


def seen_by_sandbox(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 200, response.text
    body = response.json()
    assert "control" not in body
    return dict(body["headers"])


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Host": "localhost:7070"},
        {"Host": "api.e2b.localhost:7443"},
        # Only one of the two routing headers: not a data-plane request.
        {"Host": "localhost", "E2b-Sandbox-Id": KNOWN_ID},
        # Routing headers count only on IP / localhost / sandbox.<domain> hosts, like E2B's proxy.
        {"Host": "api.e2b.localhost", **via_headers(8080)},
        {"Host": "example.com", **via_headers(8080)},
    ],
)
def test_control_plane_requests_reach_the_wrapped_app(client: httpx.Client, headers: dict[str, str]) -> None:
    response = client.get("/v2/sandboxes", headers=headers)
    assert response.json() == {"control": True, "path": "/v2/sandboxes"}


@pytest.mark.parametrize(
    "host", [None, "localhost:7070", "localhost", "[::1]:7070", "10.9.8.7", "sandbox.e2b.localhost:7443"]
)
def test_header_routing(client: httpx.Client, host: str | None) -> None:
    headers = via_headers(8080) | ({"Host": host} if host else {})
    response = client.get("/headers", params={"q": "1"}, headers=headers)
    seen = seen_by_sandbox(response)
    assert response.json()["query"] == "q=1"
    assert seen["e2b-sandbox-id"] == KNOWN_ID


@pytest.mark.parametrize("suffix", ["", ":7443", ":7070"])
def test_host_routing_with_and_without_port(client: httpx.Client, suffix: str) -> None:
    response = client.get("/headers", headers=host_for(8080, suffix=suffix))
    seen = seen_by_sandbox(response)
    assert seen["host"] == f"8080-{KNOWN_ID}.e2b.localhost{suffix}"  # Host reaches the sandbox untouched


def test_host_routing_wins_over_headers_and_ignores_case(client: httpx.Client) -> None:
    headers = {"Host": f"49983-{KNOWN_ID.upper()}.E2B.localhost", **via_headers(8080)}
    assert client.get("/health", headers=headers).status_code == 204  # 49983 from the host, not 8080


def test_each_sandbox_port_is_reachable(client: httpx.Client) -> None:
    for port in (49983, 49999, 8080):
        assert client.get("/health", headers=host_for(port)).status_code == 204


@pytest.mark.parametrize("sandbox_id", ["nosuchsandbox", "sbxpaused", "BAD-ID", "a" * 80])
def test_unknown_sandbox_is_502_was_not_found(client: httpx.Client, sandbox_id: str) -> None:
    response = client.get("/health", headers=via_headers(49983, sandbox_id))
    assert response.status_code == 502
    body = response.json()
    assert body["code"] == 502
    assert "was not found" in body["message"]
    assert body["sandboxId"] == sandbox_id[:64]


def test_unknown_sandbox_by_host(client: httpx.Client) -> None:
    response = client.get("/health", headers=host_for(49983, "nosuchsandbox"))
    assert response.status_code == 502
    assert response.json() == {"sandboxId": "nosuchsandbox", "message": "The sandbox was not found", "code": 502}


def test_closed_port_is_502_port_is_not_open(client: httpx.Client) -> None:
    response = client.get("/", headers=via_headers(3000))
    assert response.status_code == 502
    body = response.json()
    assert "port is not open" in body["message"]
    assert body["sandboxId"] == KNOWN_ID and body["port"] == 3000


@pytest.mark.parametrize("port", ["0", "65536", "-1", "abc", "80x", "8080@127.0.0.1", "1e3", "", "99999999999"])
def test_bad_port_header_is_400(client: httpx.Client, port: str) -> None:
    response = client.get("/health", headers=via_headers(port))
    assert response.status_code == 400
    assert "expected an integer from 1 to 65535" in response.json()["message"]


def test_bad_port_in_host_is_400(client: httpx.Client) -> None:
    response = client.get("/health", headers={"Host": f"http-{KNOWN_ID}.e2b.localhost"})
    assert response.status_code == 400


def test_credentials_and_other_headers_pass_through(client: httpx.Client) -> None:
    headers = {
        **via_headers(49983),
        "Authorization": "Basic dXNlcjo=",
        "X-Access-Token": "tok-123",
        "E2B-Traffic-Access-Token": "traffic-456",
        "Connect-Protocol-Version": "1",
        "X-Hop": "drop me",
        "Connection": "keep-alive, X-Hop",
    }
    response = client.get("/headers", headers=headers)
    seen = seen_by_sandbox(response)
    assert seen["authorization"] == "Basic dXNlcjo="
    assert seen["x-access-token"] == "tok-123"
    assert seen["e2b-traffic-access-token"] == "traffic-456"
    assert seen["connect-protocol-version"] == "1"
    assert "x-hop" not in seen  # named in Connection: hop-by-hop


def test_response_status_headers_and_body_come_back(client: httpx.Client) -> None:
    response = client.get("/nowhere", headers=host_for(8080))
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"message": "no route /nowhere"}


@pytest.mark.parametrize(
    "path",
    [
        *("/init", "/INIT", "//init", "/./init", "/x/../init", "/init/", "/%69nit", "/init?x=1"),
        *("/freeze", "/unfreeze", "/fsfreeze", "/fsthaw", "/collapse", "/upgrade"),
    ],
)
def test_envd_internal_paths_are_403(proxy_port: int, path: str) -> None:
    # Raw requests: httpx would normalise the path before sending it.
    for headers in (host_for(49983), via_headers(49983) | {"Host": "localhost"}):
        status, body = raw_request(proxy_port, "POST", path, headers)
        assert status == 403, (path, body)
        assert b"internal" in body


def test_internal_paths_are_only_blocked_on_envd_port(client: httpx.Client) -> None:
    assert client.post("/init", headers=host_for(8080)).json() == {"internal": True}
    assert client.get("/health", headers=host_for(49983)).status_code == 204


def test_pooled_connections_are_reused(client: httpx.Client) -> None:
    ports = {client.get("/headers", headers=host_for(8080)).json()["client"][1] for _ in range(5)}
    assert len(ports) == 1


def test_wait_port(sandbox_netns: SandboxNetns) -> None:
    assert asyncio.run(wait_port(sandbox_netns.address, 49983, "/health", timeout=5))
    assert not asyncio.run(wait_port(sandbox_netns.address, 3000, "/health", timeout=0.3))
    assert not asyncio.run(wait_port(sandbox_netns.address, 8080, "/nowhere", timeout=0.3))  # 404 is not ready


def test_pooled_connection_dropped_by_the_sandbox_is_retried(client: httpx.Client) -> None:
    # Port 8081 answers one request per connection and drops the connection at the next:
    # every second request hits a dead pooled connection and must be replayed on a new one.
    for i in range(4):
        assert client.get(f"/get{i}", headers=host_for(8081)).json()["request"] == f"GET /get{i} HTTP/1.1"
        response = client.post(f"/post{i}", content=b"payload", headers=host_for(8081))
        assert response.json() == {"request": f"POST /post{i} HTTP/1.1", "body": "payload"}


def test_a_server_answering_twice_cannot_poison_the_next_request(client: httpx.Client) -> None:
    """Issue 11 finding 8: the extra response of a misbehaving server must never reach another request."""
    for i in range(4):
        assert client.get(f"/req{i}", headers=host_for(8082)).json()["request"] == f"GET /req{i} HTTP/1.1"


def test_concurrent_requests_get_their_own_answers(proxy_port: int) -> None:
    async def run() -> list[tuple[str, str]]:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{proxy_port}", timeout=30, trust_env=False) as http:

            async def one(i: int) -> tuple[str, str]:
                headers = host_for(8080) | {"X-Request": str(i)}
                body = (await http.get("/headers", params={"i": i}, headers=headers)).json()
                return body["query"], dict(body["headers"])["x-request"]

            return await asyncio.gather(*(one(i) for i in range(60)))

    assert asyncio.run(run()) == [(f"i={i}", str(i)) for i in range(60)]
