"""Fixtures for the ns backend's isolation tests (root, real namespaces, cgroups, nftables).

Sandboxes run the base template with a test layer on top that puts ``agent.py`` at envd's path
(/opt/pmoves/bin/envd): the backend starts it exactly like envd, and tests run commands inside
through it (``ns_harness.Sandboxes.run``). After each test, and at session end, nothing may be left behind.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from isolation.ns_harness import (
    ID_PREFIX,
    Responder,
    Sandboxes,
    fake_internet_netns,
    listening_socket_in_netns,
    sandboxes_for_test,
)
from leakcheck import ns_leftovers

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
    yield from sandboxes_for_test(ns_backend, test_template)


@pytest.fixture()
def fake_internet() -> Iterator[Responder]:
    """A netns with a public-looking TEST-NET-2 address, routed from the host, running a responder."""
    with fake_internet_netns() as netns:
        responder = Responder(listening_socket_in_netns(netns, "0.0.0.0"))
        try:
            yield responder
        finally:
            responder.close()
