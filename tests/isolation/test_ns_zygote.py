"""envd forked from the template's zygote (backends/ns/zygote.py) is confined exactly like an envd
that the sandbox's launcher starts itself, holds nothing of other sandboxes, and is restarted by
the launcher when it dies.

These sandboxes run the real envd of the base template (the other isolation tests run an agent in
its place, which the backend starts cold: a layer above envd's replaces the launcher).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from isolation.ns_harness import Sandboxes, sandboxes_for_test

from pmoves_e2b.envd import ENVD_PORT
from pmoves_e2b.sandbox.backends.base import SandboxHandle, TemplateImage
from pmoves_e2b.sandbox.backends.ns import NsBackend

STATUS_FIELDS = (
    "Umask", "Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs",
    "Seccomp", "Seccomp_filters",
)  # fmt: skip
NAMESPACES = ("user", "mnt", "pid", "net", "ipc", "uts", "cgroup")


@pytest.fixture()
def envd_sandboxes(ns_backend: NsBackend, base_template: TemplateImage) -> Iterator[Sandboxes]:
    if ns_backend.zygotes is None or ns_backend.zygotes.layers_for(base_template.layers) is None:
        pytest.skip("the base template's envd layer predates zygotes; rebuild it (make templates)")
    yield from sandboxes_for_test(ns_backend, base_template)


def _envd_pids(handle: SandboxHandle) -> list[int]:
    """envd processes in the sandbox (host pids): python running pmoves_e2b.envd in its pid namespace."""
    pid_ns = os.readlink(f"/proc/{handle.details['child_pid']}/ns/pid")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "ns/pid") != pid_ns:
                continue
            if b"pmoves_e2b.envd" in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _confinement(handle: SandboxHandle, pid: int) -> dict[str, object]:
    """Everything that decides what envd (and so every command it starts) may do."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    init = handle.details["child_pid"]
    found = {
        "status": {name: status[name].strip() for name in STATUS_FIELDS},
        "limits": Path(f"/proc/{pid}/limits").read_text(),
        "cgroup": Path(f"/proc/{pid}/cgroup").read_text(),
        "namespaces": {
            ns: os.readlink(f"/proc/{pid}/ns/{ns}") == os.readlink(f"/proc/{init}/ns/{ns}") for ns in NAMESPACES
        },
        "root": os.readlink(f"/proc/{pid}/root"),
        "fd kinds": sorted({os.readlink(f"/proc/{pid}/fd/{fd}").split(":")[0] for fd in os.listdir(f"/proc/{pid}/fd")}),
        "oom_score_adj": Path(f"/proc/{pid}/oom_score_adj").read_text(),
    }
    text = json.dumps(found).replace(handle.sandbox_id, "<id>").replace(str(handle.details["uid_base"]), "<uid>")
    return dict(json.loads(text))


def _request(handle: SandboxHandle, method: str, path: str, body: bytes | None = None, **headers: str) -> int:
    conn = http.client.HTTPConnection(handle.address, ENVD_PORT, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def _wait_for(condition, timeout: float = 15.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout}s")


def test_a_forked_envd_is_confined_like_one_the_launcher_starts(
    envd_sandboxes: Sandboxes, ns_backend: NsBackend
) -> None:
    forked = envd_sandboxes.create()
    cold_backend = NsBackend(ns_backend.runtime_dir, zygote=False)
    cold = envd_sandboxes.create(backend=cold_backend)

    (forked_envd,) = _envd_pids(forked)
    (cold_envd,) = _envd_pids(cold)
    # the path really differs: a forked envd is adopted by the sandbox's init, a cold one is the launcher's child
    assert _parent(forked_envd) == forked.details["child_pid"]
    assert _parent(cold_envd) != cold.details["child_pid"]

    assert _confinement(forked, forked_envd) == _confinement(cold, cold_envd)
    assert all(_confinement(forked, forked_envd)["namespaces"].values())  # type: ignore[union-attr]
    assert _request(forked, "GET", "/health") == 204


def test_the_zygote_never_holds_a_sandboxs_init_secret(envd_sandboxes: Sandboxes, ns_backend: NsBackend) -> None:
    handles = [envd_sandboxes.create() for _ in range(2)]
    assert all(_parent(_envd_pids(h)[0]) == h.details["child_pid"] for h in handles)  # both forked
    assert ns_backend.zygotes is not None
    (zygote_pid,) = ns_backend.zygotes.pids()
    memory = _readable_memory(zygote_pid)
    assert b"pmoves_e2b.envd" in memory  # the scan sees what the zygote imported
    for handle in handles:
        assert handle.init_secret
        assert handle.init_secret.encode() not in memory


def test_the_launcher_restarts_a_forked_envd_that_died(envd_sandboxes: Sandboxes) -> None:
    handle = envd_sandboxes.create()
    (envd,) = _envd_pids(handle)
    assert _parent(envd) == handle.details["child_pid"]
    body = json.dumps({"accessToken": "t0ken"}).encode()
    status = _request(handle, "POST", "/init", body, **{"X-Envd-Init-Secret": handle.init_secret})
    assert status == 204  # the launcher restarts only an envd that has its state

    os.kill(envd, signal.SIGKILL)
    restarted = _wait_for(lambda: [pid for pid in _envd_pids(handle) if pid != envd])
    assert _parent(restarted[0]) != handle.details["child_pid"]  # started cold by the launcher
    _wait_for(lambda: _health_or_none(handle) == 204)
    assert _request(handle, "GET", "/envs") == 401  # same state: the token /init set is needed
    assert _request(handle, "GET", "/envs", **{"X-Access-Token": "t0ken"}) == 200


def _health_or_none(handle: SandboxHandle) -> int | None:
    try:
        return _request(handle, "GET", "/health")
    except OSError:
        return None


def _readable_memory(pid: int) -> bytes:
    chunks = []
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            fields = line.split()
            if not fields[1].startswith("r"):
                continue
            start, end = (int(value, 16) for value in fields[0].split("-"))
            try:
                mem.seek(start)
                chunks.append(mem.read(end - start))
            except (OSError, ValueError, OverflowError):
                continue
    return b"".join(chunks)
