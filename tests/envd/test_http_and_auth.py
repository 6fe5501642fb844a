"""envd's plain HTTP endpoints, access rules and malformed input, over raw HTTP and the SDK."""

from __future__ import annotations

import base64
import json
import os
import secrets
import time

import httpx
import pytest
from e2b import AuthenticationException, Sandbox
from e2b.sandbox.signature import get_signature

from envd.conftest import RunningEnvd, make_sandbox

CONNECT_JSON = {"Content-Type": "application/json", "Connect-Protocol-Version": "1"}


def test_health_is_204_without_auth(fresh_envd: RunningEnvd) -> None:
    assert fresh_envd.init({"accessToken": "tok"}).status_code == 204
    response = httpx.get(f"{fresh_envd.url}/health")
    assert response.status_code == 204 and response.content == b""


def test_init_requires_the_secret_when_configured(fresh_envd: RunningEnvd) -> None:
    refused = httpx.post(f"{fresh_envd.url}/init", json={"accessToken": "x"})
    assert refused.status_code == 401 and refused.json()["code"] == 401
    wrong = httpx.post(f"{fresh_envd.url}/init", json={}, headers={"X-Envd-Init-Secret": "nope"})
    assert wrong.status_code == 401
    assert fresh_envd.init({"envVars": {"A": "1"}}).status_code == 204
    assert httpx.get(f"{fresh_envd.url}/envs").json() == {"A": "1"}


def test_init_without_secret_configured_is_open(envd_user: str) -> None:
    from envd.conftest import start_envd, stop_envd

    running = start_envd(envd_user, extra_env={"ENVD_INIT_SECRET": ""})
    try:
        assert httpx.post(f"{running.url}/init", json={"envVars": {"B": "2"}}).status_code == 204
    finally:
        stop_envd(running)


def test_init_sets_env_vars_default_user_and_workdir(fresh_envd: RunningEnvd) -> None:
    body = {"envVars": {"SANDBOX_VAR": "sv"}, "defaultUser": "root", "defaultWorkdir": "/tmp"}
    assert fresh_envd.init(body).status_code == 204
    sandbox = make_sandbox(fresh_envd)
    result = sandbox.commands.run("echo $SANDBOX_VAR; whoami; pwd")
    assert result.stdout == "sv\nroot\n/tmp\n"
    assert sandbox.commands.run("echo $SANDBOX_VAR", envs={"SANDBOX_VAR": "override"}).stdout == "override\n"


def test_init_rejects_malformed_bodies(fresh_envd: RunningEnvd) -> None:
    headers = {"X-Envd-Init-Secret": fresh_envd.init_secret}
    for body in (b"{not json", b"[1,2]", b'{"envVars": {"A": 1}}', b'{"accessToken": 5}', b"\xff\xfe"):
        response = httpx.post(f"{fresh_envd.url}/init", content=body, headers=headers)
        assert response.status_code == 400, body
        assert set(response.json()) == {"code", "message"}


def test_access_token_is_required_everywhere_but_health(fresh_envd: RunningEnvd) -> None:
    token = secrets.token_hex(8)
    assert fresh_envd.init({"accessToken": token}).status_code == 204
    url = fresh_envd.url
    assert httpx.get(f"{url}/envs").status_code == 401
    assert httpx.get(f"{url}/envs", headers={"X-Access-Token": "wrong"}).status_code == 401
    assert httpx.get(f"{url}/envs", headers={"X-Access-Token": token}).status_code == 200
    rpc = httpx.post(f"{url}/process.Process/List", content=b"{}", headers=CONNECT_JSON)
    assert rpc.status_code == 401
    assert httpx.get(f"{url}/files", params={"path": "/etc/hostname"}).status_code == 401
    with pytest.raises(AuthenticationException):
        make_sandbox(fresh_envd).files.read("/etc/hostname")
    with pytest.raises(AuthenticationException):
        make_sandbox(fresh_envd).commands.run("true")
    with pytest.raises(AuthenticationException):
        make_sandbox(fresh_envd, token="wrong-token").files.list("/")
    authed = make_sandbox(fresh_envd, token=token)
    assert authed.commands.run("echo ok").stdout == "ok\n"


def test_signed_urls_allow_files_without_the_header(fresh_envd: RunningEnvd) -> None:
    token = secrets.token_hex(8)
    fresh_envd.init({"accessToken": token})
    sandbox = make_sandbox(fresh_envd, token=token)
    path = f"/tmp/envd-signed-{secrets.token_hex(4)}.txt"
    upload = sandbox.upload_url(path, use_signature_expiration=60)
    response = httpx.post(upload, files={"file": ("ignored", b"signed upload")})
    assert response.status_code == 200, response.text
    download = sandbox.download_url(path)
    assert httpx.get(download).content == b"signed upload"
    tampered = download.replace("signature=v1_", "signature=v1_x")
    assert httpx.get(tampered).status_code == 401
    expired = get_signature(path, "read", None, token, -10)
    params = {"path": path, "signature": expired["signature"], "signature_expiration": expired["expiration"]}
    refused = httpx.get(f"{fresh_envd.url}/files", params=params)
    assert refused.status_code == 401 and "expired" in refused.json()["message"]
    sandbox.files.remove(path)


def test_metrics_reports_cpu_memory_and_disk(envd: RunningEnvd) -> None:
    metrics = httpx.get(f"{envd.url}/metrics").json()
    for key in ("ts", "cpu_count", "cpu_used_pct", "mem_total", "mem_used", "mem_cache", "disk_used", "disk_total"):
        assert isinstance(metrics[key], (int, float)), key
    assert metrics["mem_total"] > metrics["mem_used"] > 0
    assert metrics["disk_total"] >= metrics["disk_used"] > 0
    assert 0 <= metrics["cpu_used_pct"] <= 100


def test_unknown_path_and_method(envd: RunningEnvd) -> None:
    assert httpx.get(f"{envd.url}/nope").json() == {"code": 404, "message": "no such endpoint: /nope"}
    assert httpx.delete(f"{envd.url}/files").status_code == 405


# --- malformed input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{bad json", "invalid_argument"),
        (b'{"process": {"pid": "not-a-number"}}', "invalid_argument"),
        (b'{"process": 5}', "invalid_argument"),
        (b"\xff\xfe\xfd", "invalid_argument"),
    ],
)
def test_bad_rpc_bodies_are_invalid_argument(envd: RunningEnvd, body: bytes, code: str) -> None:
    response = httpx.post(f"{envd.url}/process.Process/SendSignal", content=body, headers=CONNECT_JSON)
    assert response.status_code == 400
    assert response.json()["code"] == code


def test_unknown_pid_is_not_found(envd: RunningEnvd) -> None:
    body = json.dumps({"process": {"pid": 999999}, "signal": "SIGNAL_SIGKILL"}).encode()
    response = httpx.post(f"{envd.url}/process.Process/SendSignal", content=body, headers=CONNECT_JSON)
    assert response.status_code == 404 and response.json()["code"] == "not_found"


def test_unknown_rpc_method_is_404(envd: RunningEnvd) -> None:
    response = httpx.post(f"{envd.url}/process.Process/Nope", content=b"{}", headers=CONNECT_JSON)
    assert response.status_code == 404


def test_huge_rpc_body_is_resource_exhausted(envd: RunningEnvd) -> None:
    huge = b'{"path": "' + b"a" * (17 << 20) + b'"}'
    response = httpx.post(f"{envd.url}/filesystem.Filesystem/Stat", content=huge, headers=CONNECT_JSON, timeout=30)
    assert response.json()["code"] == "resource_exhausted"


def test_huge_init_body_is_413(fresh_envd: RunningEnvd) -> None:
    headers = {"X-Envd-Init-Secret": fresh_envd.init_secret, "Content-Type": "application/json"}
    response = httpx.post(f"{fresh_envd.url}/init", content=b" " * (2 << 20), headers=headers)
    assert response.status_code == 413


def test_bad_paths_are_clear_errors(envd: RunningEnvd) -> None:
    stat = f"{envd.url}/filesystem.Filesystem/Stat"
    for path, code in (
        ("~other/x", "invalid_argument"),
        ("/tmp/\u0000x", "invalid_argument"),
        ("/no/such", "not_found"),
    ):
        response = httpx.post(stat, json={"path": path}, headers=CONNECT_JSON)
        assert response.json()["code"] == code, path
    files = f"{envd.url}/files"
    assert httpx.get(files).status_code == 400
    assert httpx.get(files, params={"path": "~other/x"}).status_code == 400
    assert httpx.get(f"{files}?path=%ff%fe").status_code == 400


def test_bad_uploads_are_400(envd: RunningEnvd) -> None:
    # Relative paths land in the throwaway user's home, removed with it.
    files = f"{envd.url}/files"
    assert (
        httpx.post(files, content=b"x", headers={"Content-Type": "text/plain"}, params={"path": "x"}).status_code == 400
    )
    octet = {"Content-Type": "application/octet-stream"}
    assert httpx.post(files, content=b"x", headers=octet).status_code == 400  # no path
    bad_gzip = {**octet, "Content-Encoding": "gzip"}
    assert httpx.post(files, content=b"not gzip", headers=bad_gzip, params={"path": "bad.gz"}).status_code == 400
    broken = {"Content-Type": "multipart/form-data; boundary=XYZ"}
    assert httpx.post(files, content=b"--XYZ\r\nno end", headers=broken).status_code == 400
    assert httpx.post(files, content=b"x", headers={"Content-Type": "multipart/form-data"}).status_code == 400
    assert httpx.post(files, params={"username": "no-such-user"}, files={"file": ("a", b"x")}).status_code == 401


def test_basic_auth_header_garbage_is_unauthenticated(envd: RunningEnvd) -> None:
    headers = {**CONNECT_JSON, "Authorization": "Basic !!!"}
    response = httpx.post(f"{envd.url}/process.Process/List", content=b"{}", headers=headers)
    assert response.json()["code"] == "unauthenticated"
    good = base64.b64encode(b"root:").decode()
    ok = httpx.post(
        f"{envd.url}/process.Process/List", content=b"{}", headers={**CONNECT_JSON, "Authorization": f"Basic {good}"}
    )
    assert ok.status_code == 200


def test_envd_survives_a_client_dropping_mid_upload(envd: RunningEnvd, sandbox: Sandbox) -> None:
    def body():  # type: ignore[no-untyped-def]
        yield b"x" * 1000
        raise RuntimeError("client gives up")

    with pytest.raises(RuntimeError):
        httpx.post(
            f"{envd.url}/files",
            params={"path": "dropped"},
            content=body(),
            headers={"Content-Type": "application/octet-stream"},
        )
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and httpx.get(f"{envd.url}/health").status_code != 204:
        time.sleep(0.05)
    assert sandbox.commands.run("echo alive").stdout == "alive\n"


def test_fifo_paths_are_refused_without_hanging(envd: RunningEnvd, tmp_path_factory: pytest.TempPathFactory) -> None:
    fifo = tmp_path_factory.mktemp("fifo") / "pipe"
    os.mkfifo(fifo)
    assert httpx.get(f"{envd.url}/files", params={"path": str(fifo)}, timeout=5).status_code == 400
    upload = httpx.post(
        f"{envd.url}/files",
        params={"path": str(fifo)},
        content=b"x",
        headers={"Content-Type": "application/octet-stream"},
        timeout=5,
    )
    assert upload.status_code == 400


def test_client_leaving_mid_download_is_harmless(
    fresh_envd: RunningEnvd, tmp_path_factory: pytest.TempPathFactory
) -> None:
    big = tmp_path_factory.mktemp("dl") / "big.bin"
    big.write_bytes(os.urandom(1 << 20) * 64)
    with httpx.stream("GET", f"{fresh_envd.url}/files", params={"path": str(big)}) as response:
        assert response.status_code == 200
        next(response.iter_bytes())
    assert httpx.get(f"{fresh_envd.url}/health").status_code == 204


def test_every_route_needs_the_token_except_the_allow_list(fresh_envd: RunningEnvd) -> None:
    from pmoves_e2b.envd.gen.filesystem import filesystem_pb
    from pmoves_e2b.envd.gen.process import process_pb

    fresh_envd.init({"accessToken": "the-token"})
    rpc_paths = [
        f"/{service.type_name}/{method.name}"
        for module in (process_pb, filesystem_pb)
        for service in module.desc().services
        for method in service.methods
    ]
    assert len(rpc_paths) == 17
    for path in rpc_paths:
        response = httpx.post(f"{fresh_envd.url}{path}", content=b"{}", headers=CONNECT_JSON)
        assert response.status_code == 401, path
    for method, path in (("GET", "/envs"), ("GET", "/metrics"), ("GET", "/unknown"), ("POST", "/files/compose")):
        assert httpx.request(method, f"{fresh_envd.url}{path}").status_code == 401, path
    # The allow-list: health, and /files (which checks header or signature itself).
    assert httpx.get(f"{fresh_envd.url}/health").status_code == 204
    assert httpx.get(f"{fresh_envd.url}/files", params={"path": "/etc/hostname"}).status_code == 401
    signed_ok = httpx.get(
        f"{fresh_envd.url}/files", params={"path": "/etc/hostname"}, headers={"X-Access-Token": "the-token"}
    )
    assert signed_ok.status_code == 200
