"""Shared fixtures. Stack fixtures start the REAL stack (`pmoves-e2b up`) on free ports.

Fixtures
--------
``running_stack`` (session scope) -> ``RunningStack``
    One whole stack (embedded nats-server + the four services) for the test session, in a
    temp data dir, every port free-picked, ``E2B_TEMPLATES_DIR`` = the shared default templates
    dir (``$E2B_TEMPLATES_DIR`` if set when pytest starts, else ``/var/lib/pmoves-e2b/templates``
    as root) so templates are built once. Stopped with ``pmoves-e2b down`` at the end; teardown
    fails if a process or a mount tied to the data dir is left (after cleaning them up).
    Mark tests that use it ``@pytest.mark.stack``.

``sdk_env`` (function scope) -> ``dict[str, str]``
    Puts ``E2B_API_KEY``, ``E2B_API_URL``, ``E2B_SANDBOX_URL`` of ``running_stack`` into
    ``os.environ`` for the test (and removes other ``E2B_*`` client variables), so the stock SDK
    works unmodified: ``Sandbox.create()``.

``stack_factory`` (function scope) -> ``Callable[..., RunningStack]``
    ``stack_factory(extra_env={...}, start=True)`` makes an extra, isolated stack (own data dir
    and ports) for tests that must stop, break or reconfigure one; all are stopped at test end.

``RunningStack`` attributes
    ``data_dir``, ``env`` (full environment to run the CLI or any child with), ``settings_env``
    (only the variables the fixture set), ``ports`` (keys: sandbox, sandbox_tls, mcp, surf,
    desktop, nats, nats_monitor), ``urls`` (service key -> base URL), ``sandbox_url``, ``mcp_url``,
    ``surf_url``, ``desktop_url``, ``nats_url``, ``tls_port``, ``ca_bundle`` (``<data>/tls/bundle.pem``),
    ``api_key``, ``mcp_token``, ``desktop_token``, ``sdk_env``, ``max_sandboxes``.
``RunningStack`` methods
    ``cli(*args, timeout=60)`` -> CompletedProcess (text), ``up(timeout=120)``, ``down(timeout=60)``,
    ``service_pid(key)`` (key: sandbox/mcp/surf/desktop/nats/supervisor), ``health(key)`` -> (status
    code, JSON), ``wait_healthy(key=None, timeout=60)`` (None = all five), ``log(component)`` -> str,
    ``processes()`` -> live pids tied to the data dir (command line, cwd or E2B_DATA_DIR in env).

``RunningStack`` and the helpers live in ``tests/stack/harness.py``; import them from any test as
``from stack.harness import free_ports``. Every test helper is imported by its directory like that
(``from isolation.ns_harness import ...``), never by bare module name or relatively
(tests/boundaries/test_test_imports.py checks it). Helpers:
``free_ports(n)``, ``clean_environ()`` (os.environ without our settings), ``processes_of(data_dir)``,
``mounts_of(data_dir)``, ``make_stack(extra_env)``, ``stop_and_clean(stack)``.

Settings every stack of the session shares go into ``STACK_TEST_ENV`` in tests/stack/harness.py
(edit with care).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import pytest
from stack.harness import RunningStack, make_stack, started_stack, stop_and_clean

from pmoves_e2b.sandbox import tiers

# Modules that run once per isolation tier this machine can run (ids [ns], [gvisor], ...). Their
# ``running_stack`` is, for a tier other than ns, a second stack with that tier as E2B_ISOLATION
# and no warm pool (which would boot every pooled template, desktops too, in that tier).
TIERED_MODULES = {
    "test_sdk_data_plane",
    "test_sdk_program_xattrs",  # gvisor: the shim and envd stand in for the root's missing user xattrs
    "test_sdk_sudo",  # gvisor: its SO_PEERCRED names envd itself, so the shim sends SCM_CREDENTIALS
    "test_sdk_lifecycle",
    "test_tier_sdk",
    "test_sdk_pause_to_disk",
    "test_sdk_snapshots",
    "test_stock_sdk",
    "test_sdk_egress_rules",  # gvisor redirects domain rules on the host's side (gvisor/redirect.py)
}
TESTED_TIERS = ("ns", "gvisor")  # microvm (TCG here: seconds per boot) runs its own slow subset


def pytest_configure(config: pytest.Config) -> None:
    """In CI every isolation tier must be testable: a missing runsc or QEMU would otherwise turn the
    tier suites into silent skips (a fresh machine once did exactly that)."""
    if not os.environ.get("CI") or config.getoption("collectonly"):
        return
    missing = [f"{status.name}: {status.reason}" for status in tiers.probe() if not status.available]
    if missing:
        raise pytest.UsageError(
            f"CI tests every isolation tier, and this host lacks {'; '.join(missing)}. "
            "Run `make test-sysdeps` (it installs them)."
        )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.module.__name__.rpartition(".")[2] in TIERED_MODULES and "running_stack" in metafunc.fixturenames:
        available = [status.name for status in tiers.probe() if status.available and status.name in TESTED_TIERS]
        metafunc.parametrize("running_stack", available, indirect=True, scope="session")


@pytest.fixture(scope="session")
def _ns_stack() -> Iterator[RunningStack]:
    with started_stack() as stack:
        yield stack


@pytest.fixture(scope="session")
def tier_stacks() -> Iterator[Callable[[str], RunningStack]]:
    stacks: dict[str, RunningStack] = {}
    with contextlib.ExitStack() as exits:

        def stack_of(name: str) -> RunningStack:
            if name not in stacks:
                stacks[name] = exits.enter_context(started_stack({"E2B_ISOLATION": name, "E2B_POOL_SIZE": "0"}))
            return stacks[name]

        yield stack_of


@pytest.fixture(scope="session")
def running_stack(request: pytest.FixtureRequest) -> RunningStack:
    """The shared stack; in TIERED_MODULES the stack of the tier in the test's id."""
    tier = getattr(request, "param", "ns")
    if tier == "ns":
        stack: RunningStack = request.getfixturevalue("_ns_stack")
        return stack
    return request.getfixturevalue("tier_stacks")(tier)


@pytest.fixture()
def tier(running_stack: RunningStack) -> str:
    """The isolation tier of the test's stack."""
    return running_stack.settings_env.get("E2B_ISOLATION", "ns")


@pytest.fixture()
def sdk_env(running_stack: RunningStack, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for name in list(os.environ):
        if name.startswith("E2B_"):
            monkeypatch.delenv(name)
    values = running_stack.sdk_env
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


@pytest.fixture()
def stack_factory() -> Iterator[Callable[..., RunningStack]]:
    stacks: list[RunningStack] = []

    def factory(extra_env: dict[str, str] | None = None, start: bool = True) -> RunningStack:
        stack = make_stack(extra_env)
        stacks.append(stack)
        if start:
            stack.up()
        return stack

    yield factory
    errors = []
    for stack in stacks:
        try:
            stop_and_clean(stack)
        except AssertionError as exc:
            errors.append(str(exc))
    assert not errors, "; ".join(errors)
