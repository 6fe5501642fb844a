"""Fixtures for the ns backend's isolation tests (root, real namespaces, cgroups, nftables).

Sandboxes run the base template with a test layer on top that puts ``agent.py`` at envd's path
(/opt/pmoves/bin/envd): the backend starts it exactly like envd, and tests run commands inside
through it (``ns_harness.Sandboxes.run``). After each test, and at session end, nothing may be left behind.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from leakcheck import ns_leftovers
from ns_harness import (
    FAKE_INTERNET_HOST_IP,
    FAKE_INTERNET_HOST_VETH,
    FAKE_INTERNET_NETNS,
    FAKE_INTERNET_SERVER_IP,
    ID_PREFIX,
    Responder,
    Sandboxes,
    listening_socket_in_netns,
)

from pmoves_e2b.sandbox.backends.base import TemplateImage
from pmoves_e2b.sandbox.backends.ns import NsBackend

AGENT = Path(__file__).with_name("agent.py")


def _base_template() -> TemplateImage:
    from pmoves_e2b.sandbox.templates.store import load_template

    try:
        return load_template("base")
    except Exception as exc:  # noqa: BLE001 - any reason the template is unusable
        pytest.skip(f"base template not built ({exc}); run `make templates`")


@pytest.fixture(scope="session")
def base_template() -> TemplateImage:
    return _base_template()


@pytest.fixture(scope="session")
def test_template(base_template: TemplateImage, tmp_path_factory: pytest.TempPathFactory) -> TemplateImage:
    layer = tmp_path_factory.mktemp("agent-layer")
    target = layer / "opt/pmoves/bin/envd"
    target.parent.mkdir(parents=True)
    shutil.copy(AGENT, target)
    target.chmod(0o755)
    layer.chmod(0o755)
    return TemplateImage(name="isolation-test", layers=(str(layer), *base_template.layers))


@pytest.fixture(scope="session")
def runtime_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pmoves-e2b-iso-")) / "sandboxes"
    yield path
    shutil.rmtree(path.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def ns_backend(runtime_dir: Path) -> Iterator[NsBackend]:
    backend = NsBackend(runtime_dir)
    yield backend
    asyncio.run(backend.cleanup_orphans(set()))
    backend.close()
    left = ns_leftovers(
        runtime_dir, backend.cgroup_parent_name, ID_PREFIX, set(), host_setup_mounts=(runtime_dir, backend.launch_root)
    )
    assert not left, f"left behind at session end: {left}"


@pytest.fixture()
def sandboxes(ns_backend: NsBackend, test_template: TemplateImage) -> Iterator[Sandboxes]:
    box = Sandboxes(ns_backend, test_template)
    yield box
    for handle in box.handles:
        asyncio.run(ns_backend.destroy(handle))
    left = ns_leftovers(
        ns_backend.runtime_dir,
        ns_backend.cgroup_parent_name,
        ID_PREFIX,
        box.slots,
        peer_roots=(ns_backend.launch_root,),
    )
    assert not left, f"left behind after the test: {left}"


@pytest.fixture()
def fake_internet() -> Iterator[Responder]:
    """A netns with a public-looking TEST-NET-3 address, routed from the host, running a responder."""
    script = (
        f"netns add {FAKE_INTERNET_NETNS}\n"
        f"link add {FAKE_INTERNET_HOST_VETH} type veth peer name eth0 netns {FAKE_INTERNET_NETNS}\n"
        f"addr add {FAKE_INTERNET_HOST_IP}/24 dev {FAKE_INTERNET_HOST_VETH}\n"
        f"link set {FAKE_INTERNET_HOST_VETH} up\n"
    )
    subprocess.run(["ip", "-batch", "-"], input=script.encode(), check=True)
    try:
        subprocess.run(
            ["ip", "-n", FAKE_INTERNET_NETNS, "-batch", "-"],
            input=(
                f"addr add {FAKE_INTERNET_SERVER_IP}/24 dev eth0\nlink set eth0 up\nlink set lo up\n"
                f"route add default via {FAKE_INTERNET_HOST_IP}\n"
            ).encode(),
            check=True,
        )
        responder = Responder(listening_socket_in_netns(Path("/run/netns") / FAKE_INTERNET_NETNS, "0.0.0.0"))
        try:
            yield responder
        finally:
            responder.close()
    finally:
        subprocess.run(["ip", "link", "del", FAKE_INTERNET_HOST_VETH], check=False)
        subprocess.run(["ip", "netns", "del", FAKE_INTERNET_NETNS], check=True)
