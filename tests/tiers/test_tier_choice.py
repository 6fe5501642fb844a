"""Choosing a sandbox's isolation tier (sandbox/tiers.py): E2B_ISOLATION, the template's
``isolation`` setting, the create's metadata ``e2b.isolation``; refusals name what this host runs.

Through the stock `e2b` SDK against the running stack, plus the registry's own rules without one.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2b import Sandbox
from e2b.exceptions import SandboxException
from stack.harness import SHARED_TEMPLATES_DIR, RunningStack

from pmoves_e2b.sandbox.errors import BadRequest
from pmoves_e2b.sandbox.tiers import METADATA_KEY, TIERS, Tiers, TierStatus, probe


@pytest.mark.stack
def test_health_and_status_list_the_tiers_and_the_default(running_stack: RunningStack) -> None:
    code, body = running_stack.health("sandbox")
    assert code == 200
    assert body["isolation"]["default"] == "ns"
    assert body["isolation"]["tiers"]["ns"] == {"available": True}
    assert set(body["isolation"]["tiers"]) == set(TIERS)
    status = running_stack.cli("status")
    assert status.returncode == 0, status.stderr
    assert "isolation tiers (default: ns)" in status.stdout
    assert re.search(r"│ ns +│ available", status.stdout), status.stdout


@pytest.mark.stack
def test_metadata_chooses_the_tier_and_an_unknown_one_is_a_400_naming_the_tiers(sdk_env: dict[str, str]) -> None:
    with pytest.raises(SandboxException) as refused:
        Sandbox.create(metadata={METADATA_KEY: "hyperjail"}, timeout=30)
    message = str(refused.value)
    assert "400" in message and "unknown isolation tier 'hyperjail'" in message
    assert "Tiers available here: ns" in message and METADATA_KEY in message
    sbx = Sandbox.create(metadata={METADATA_KEY: "ns"}, timeout=60)
    try:
        assert sbx.commands.run("echo chosen").stdout == "chosen\n"
        assert sbx.get_info().metadata[METADATA_KEY] == "ns"
    finally:
        sbx.kill()


@pytest.fixture()
def template_with_tier() -> Iterator[tuple[str, Path]]:
    """A new template record (base's layers) whose isolation setting the test writes."""
    name = f"tiertest-{secrets.token_hex(4)}"
    record = json.loads((SHARED_TEMPLATES_DIR / "base.json").read_text())
    path = SHARED_TEMPLATES_DIR / f"{name}.json"
    path.write_text(json.dumps({**record, "name": name, "isolation": "hyperjail"}))
    try:
        yield name, path
    finally:
        path.unlink()


@pytest.mark.stack
def test_the_template_setting_is_used_and_metadata_overrides_it(
    sdk_env: dict[str, str], template_with_tier: tuple[str, Path]
) -> None:
    name, _ = template_with_tier
    with pytest.raises(SandboxException, match=f"unknown isolation tier 'hyperjail' \\(template '{name}'\\)"):
        Sandbox.create(template=name, timeout=30)
    sbx = Sandbox.create(template=name, metadata={METADATA_KEY: "ns"}, timeout=60)
    try:
        assert sbx.commands.run("echo overridden").stdout == "overridden\n"
    finally:
        sbx.kill()


def test_an_unavailable_tier_is_refused_with_its_reason_and_what_is_available() -> None:
    tiers = Tiers(
        "ns",
        [TierStatus("ns", "n", None), TierStatus("jail", "j", "needs /dev/jail")],
        {},
    )
    assert tiers.choose(None, "base", "") == "ns"
    assert tiers.choose("ns", "base", "jail") == "ns"
    with pytest.raises(BadRequest) as refused:
        tiers.choose("jail", "base", "")
    assert refused.value.status == 400
    assert refused.value.message.startswith(
        f"isolation tier 'jail' (metadata '{METADATA_KEY}') is not available on this host: needs /dev/jail."
    )
    assert "Tiers available here: ns; unavailable: jail (needs /dev/jail)" in refused.value.message
    with pytest.raises(BadRequest, match="'jail' \\(template 'base'\\) is not available"):
        tiers.choose(None, "base", "jail")
    assert tiers.report() == {
        "default": "ns",
        "tiers": {"ns": {"available": True}, "jail": {"available": False, "reason": "needs /dev/jail"}},
    }


def test_tiers_left_out_of_e2b_isolation_tiers_are_unavailable() -> None:
    statuses = {s.name: s for s in probe("no-such-tier")}
    assert set(statuses) == set(TIERS)
    assert all(s.reason == "not in E2B_ISOLATION_TIERS" for s in statuses.values())
    assert {s.name: s.reason for s in probe("ns")}["ns"] is None  # this machine runs ns (root, bwrap)


class _Exporting:
    """A tier's backend class with filesystem snapshots only."""

    name = "exporting"

    async def export_filesystem(self, handle: object, dest: Path) -> None:
        raise AssertionError("not called")


def _never_made() -> Any:
    raise AssertionError("a backend was made to answer what its tier can do")


def test_what_a_tier_has_is_read_from_its_class_without_making_its_backend() -> None:
    tiers = Tiers(
        "ns",
        [TierStatus("exporting", "e", None), TierStatus("away", "a", "needs /dev/away"), TierStatus("bare", "b", None)],
        {"exporting": _never_made, "away": _never_made, "bare": _never_made},
        {"exporting": lambda: _Exporting, "away": lambda: _Exporting},
    )
    assert tiers.has("exporting", "export_filesystem")
    assert not tiers.has("exporting", "export_filesystem", "checkpoint")
    assert tiers.has("away", "export_filesystem")  # what it has; that this host cannot run it is its status
    assert not tiers.has("bare", "export_filesystem")  # nothing says it has it
    assert not tiers.has("unknown", "export_filesystem")
    assert tiers.made() == []
