"""Template versions (name:tag) and builds that outlive a restart, with the stock SDK's Template API."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from compat.private_templates import private_templates_stack
from e2b import Sandbox, Template
from e2b.exceptions import SandboxException, TemplateException

pytestmark = pytest.mark.stack


@pytest.fixture()
def own_stack(stack_factory: Any, running_stack: Any, tmp_path: Path) -> Any:
    with private_templates_stack(stack_factory, running_stack, tmp_path / "templates") as (stack, _):
        yield stack


def _api() -> tuple[str, dict[str, str]]:
    return os.environ["E2B_API_URL"], {"X-API-KEY": os.environ["E2B_API_KEY"]}


def _marker(sandbox: Sandbox) -> str:
    return sandbox.files.read("/home/user/version.txt").strip()


def test_tags_version_builds_and_moving_a_tag_leaves_running_sandboxes_alone(own_stack: Any) -> None:
    name = f"t-{uuid.uuid4().hex[:8]}"
    v1 = Template.build(Template().from_template("base").run_cmd("echo one > /home/user/version.txt"), f"{name}:v1")
    assert (v1.template_id, v1.tags) == (name, ["v1"])
    v2 = Template.build(
        Template().from_template("base").run_cmd("echo two > /home/user/version.txt"), f"{name}:v2", tags=["stable"]
    )
    assert sorted(v2.tags) == ["stable", "v2"]
    # Only the tags that were given: no default build, so the bare name does not start a sandbox.
    with pytest.raises(
        SandboxException, match=f"404: template '{name}' has no tag 'default' \\(its tags: stable, v1, v2\\)"
    ):
        Sandbox.create(template=name, timeout=30)
    assert Template.exists(f"{name}:v1") and not Template.exists(f"{name}:v9")

    old = Sandbox.create(template=f"{name}:v1", timeout=120)
    try:
        assert _marker(old) == "one"
        moved = Template.assign_tags(f"{name}:v2", ["v1", "default"])
        assert moved.build_id == v2.build_id and sorted(moved.tags) == ["default", "v1"]
        # The sandbox of the old build keeps running on its layers; new ones get the new build.
        assert _marker(old) == "one"
        for ref in (f"{name}:v1", name, f"{name}:stable", f"{name}:{v2.build_id}"):
            fresh = Sandbox.create(template=ref, timeout=30)
            try:
                assert _marker(fresh) == "two", ref
            finally:
                fresh.kill()
    finally:
        old.kill()

    tags = {t.tag: t.build_id for t in Template.get_tags(name)}
    assert tags == {"v1": v2.build_id, "v2": v2.build_id, "stable": v2.build_id, "default": v2.build_id}
    Template.remove_tags(name, ["v1", "stable"])
    assert sorted(t.tag for t in Template.get_tags(name)) == ["default", "v2"]
    with pytest.raises(SandboxException, match="404"):
        Sandbox.create(template=f"{name}:v1", timeout=30)

    # Bad input: E2B's error shape, nothing changed.
    url, key = _api()
    for bad in (":invalid-tag", f"{name}:", "a b"):
        with pytest.raises(TemplateException, match="400"):
            Template.assign_tags(f"{name}:v2", bad)
    assert (
        httpx.post(f"{url}/templates/tags", json={"target": f"{name}:nope", "tags": ["x"]}, headers=key).status_code
        == 404
    )
    gone = httpx.request("DELETE", f"{url}/templates/tags", json={"name": name, "tags": ["v2", "nope"]}, headers=key)
    assert gone.status_code == 404 and "nope" in gone.json()["message"], gone.text
    builtin = httpx.post(f"{url}/templates/tags", json={"target": "base", "tags": ["mine"]}, headers=key)
    assert builtin.status_code == 400 and builtin.json()["code"] == 400
    assert sorted(t.tag for t in Template.get_tags(name)) == ["default", "v2"]
    assert httpx.get(f"{url}/templates/{name}:v2/tags", headers=key).status_code == 400


def test_template_and_build_status_survive_a_restart_and_a_cut_build_is_failed(own_stack: Any) -> None:
    name = f"t-{uuid.uuid4().hex[:8]}"
    done = Template.build(Template().from_template("base").run_cmd("echo built"), name)
    with pytest.raises(Exception, match="step 1 failed"):
        Template.build(Template().from_template("base").run_cmd("echo broken-output; exit 4"), name)
    cut = Template.build_in_background(Template().from_template("base").run_cmd("sleep 3; echo late"), f"{name}:cut")
    deadline = time.monotonic() + 20
    while Template.get_build_status(cut).status.value != "building" and time.monotonic() < deadline:
        time.sleep(0.1)

    old_pid = own_stack.service_pid("sandbox")
    os.kill(old_pid, signal.SIGKILL)
    own_stack.wait_healthy("sandbox", timeout=60)
    assert own_stack.service_pid("sandbox") != old_pid
    time.sleep(4)  # the cut build's command (sleep 3) has ended with the old process's namespace

    status = Template.get_build_status(done, logs_offset=0)
    assert status.status.value == "ready" and any("echo built" in e.message for e in status.log_entries)
    interrupted = Template.get_build_status(cut)
    assert interrupted.status.value == "error" and "interrupted" in (interrupted.reason.message or "")
    url, key = _api()
    shown = httpx.get(f"{url}/templates/{name}", headers=key)
    assert shown.status_code == 200, shown.text
    builds = shown.json()["builds"]
    assert [b["status"] for b in builds] == ["ready", "error", "error"], builds
    assert builds[0]["buildID"] == done.build_id
    assert {"buildID", "status", "createdAt", "updatedAt", "cpuCount", "memoryMB"} <= set(builds[0])
    assert httpx.get(f"{url}/templates/no-such-template", headers=key).status_code == 404
    sandbox = Sandbox.create(template=name, timeout=30)  # the template itself is still there
    sandbox.kill()
