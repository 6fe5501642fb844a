"""Fixtures of the e2b-surf tests.

``internet_netns`` (session scope) -> Path: the "fake internet" netns (FAKE_INTERNET_SERVER_IP,
198.51.100.80, routed from the host). Its names are fixed, so one fixture makes it for the whole
session and every site listens in it (``listening_socket_in_netns(internet_netns, "0.0.0.0")``);
run these tests under ``flock /tmp/pmoves-netns.lock``.

``site`` (session) -> ``surf_site.Site``: the multi-page test site at http://198.51.100.80/ (port 80
of that netns). ``model_doubles`` (session) -> ``agent_harness.ModelDoubles``: local model services
speaking OpenAI's and Anthropic's computer-use wire formats and OpenAI-compatible chat; ``surf_stack`` (session): a stack of its
own with ``E2B_SURF_CONCURRENT=2`` and agent mode's model settings pointing at those services (tests
may restart its e2b-surf). ``surf``: an authenticated ``surf_harness.SurfClient`` of it (the site's
request log cleared).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from isolation.ns_harness import fake_internet_netns, listening_socket_in_netns
from stack.harness import RunningStack, started_stack
from surf.agent_harness import FormSite, ModelDoubles, model_services
from surf.surf_harness import SURF_CONCURRENT, SurfClient
from surf.surf_site import Site, serve_site


@pytest.fixture(scope="session")
def internet_netns() -> Iterator[Path]:
    with fake_internet_netns() as netns:
        yield netns


@pytest.fixture(scope="session")
def site(internet_netns: Path) -> Iterator[Site]:
    with serve_site(internet_netns) as served:
        yield served


@pytest.fixture(scope="session")
def model_doubles() -> Iterator[ModelDoubles]:
    with model_services() as doubles:
        yield doubles


@pytest.fixture(scope="session")
def surf_stack(model_doubles: ModelDoubles) -> Iterator[RunningStack]:
    env = {"E2B_SURF_CONCURRENT": str(SURF_CONCURRENT), "E2B_SURF_TIMEOUT": "180", **model_doubles.env}
    with started_stack(env) as stack:
        yield stack


@pytest.fixture()
def surf(surf_stack: RunningStack, site: Site) -> Iterator[SurfClient]:
    client = SurfClient(surf_stack)
    site.clear()
    yield client
    client.close()


@pytest.fixture(scope="module")
def form_site(internet_netns: Path) -> Iterator[FormSite]:
    """The contact form the agent tests have the model fill in and send, in the fake internet."""
    site = FormSite(listening_socket_in_netns(internet_netns, "0.0.0.0"))
    yield site
    site.close()


@pytest.fixture()
def doubles(model_doubles: ModelDoubles) -> ModelDoubles:
    """The model services with no requests recorded yet."""
    model_doubles.reset()
    return model_doubles
