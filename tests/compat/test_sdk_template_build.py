"""Custom templates built with the stock SDK's Template().build against a real stack."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from compat.private_templates import private_templates_stack
from e2b import Sandbox, Template
from e2b.exceptions import BuildException

pytestmark = pytest.mark.stack


@pytest.fixture()
def own_templates(stack_factory: Any, running_stack: Any, tmp_path: Path) -> Any:
    """A stack whose templates dir is private, so builds write only there."""
    with private_templates_stack(stack_factory, running_stack, tmp_path / "templates") as (_, templates):
        yield templates


def test_build_on_base_runs_steps_caches_them_and_sandboxes_use_it(own_templates: Path) -> None:
    name = f"t-{uuid.uuid4().hex[:8]}"
    marker = uuid.uuid4().hex
    template = (
        Template()
        .from_template("base")
        .set_envs({"GREETING": marker})
        .run_cmd("echo $GREETING > /etc/greeting", user="root")
        .set_workdir("/home/user/app")
        .run_cmd("echo made by $(whoami) in $(pwd) > made.txt")
    )
    logs: list[str] = []
    Template.build(template, name, on_build_logs=lambda e: logs.append(e.message))
    assert not any("CACHED" in line for line in logs), logs
    assert Template.exists(name)

    sandbox = Sandbox.create(template=name, timeout=60)
    try:
        assert sandbox.files.read("/etc/greeting").strip() == marker
        assert sandbox.files.read("/home/user/app/made.txt").strip() == "made by user in /home/user/app"
    finally:
        sandbox.kill()

    # The same steps again: every layer comes from the cache.
    again: list[str] = []
    Template.build(template, name, on_build_logs=lambda e: again.append(e.message))
    assert sum("CACHED" in line for line in again) == 2, again


def test_a_failing_step_fails_the_build_with_its_output_and_the_old_build_keeps_working(own_templates: Path) -> None:
    name = f"t-{uuid.uuid4().hex[:8]}"
    Template.build(Template().from_template("base").run_cmd("echo v1 > /tmp/../home/user/v.txt"), name)
    broken = Template().from_template("base").run_cmd("echo about-to-fail-output; exit 3")
    with pytest.raises(BuildException, match="(?s)step 1 failed.*about-to-fail-output"):
        Template.build(broken, name)
    sandbox = Sandbox.create(template=name, timeout=60)
    try:
        assert sandbox.files.read("/home/user/v.txt").strip() == "v1"
    finally:
        sandbox.kill()


def test_bad_requests_are_refused_with_400_and_nothing_is_built(own_templates: Path) -> None:
    before = sorted(p.name for p in (own_templates / "layers").iterdir())
    with pytest.raises(Exception, match="invalid template name"):
        Template.build(Template().from_template("base").run_cmd("true"), "../escape")
    with pytest.raises(Exception, match="built in"):
        Template.build(Template().from_template("base").run_cmd("true"), "base")
    with pytest.raises(BuildException, match="not a built template"):
        Template.build(Template().from_template("no-such-parent").run_cmd("true"), "child-x")
    with pytest.raises(BuildException, match="not supported"):
        Template.build(Template().from_image("debian:12").run_cmd("true"), "child-y")
    assert sorted(p.name for p in (own_templates / "layers").iterdir()) == before
    assert not (own_templates / "child-x.json").exists()


def test_copy_uploads_files_checks_their_hash_and_sets_owner_and_mode(own_templates: Path, tmp_path: Path) -> None:
    context = tmp_path / "ctx"
    (context / "app").mkdir(parents=True)
    (context / "app" / "main.py").write_text("print('hi')\n")
    (context / "app" / "lib.txt").write_text("lib\n")
    (context / "single.txt").write_text("one file\n")
    name = f"t-{uuid.uuid4().hex[:8]}"
    template = (
        Template(file_context_path=str(context))
        .from_template("base")
        .copy("app", "/home/user/app/")
        .copy("single.txt", "/opt/single.txt", user="root", mode=0o600)
    )
    Template.build(template, name)
    sandbox = Sandbox.create(template=name, timeout=60)
    try:
        listing = sandbox.commands.run(
            "stat -c '%U %a %n' /home/user/app/main.py /home/user/app/lib.txt /opt/single.txt", user="root"
        ).stdout.split("\n")
        assert listing[:3] == [
            "user 644 /home/user/app/main.py",
            "user 644 /home/user/app/lib.txt",
            "root 600 /opt/single.txt",
        ], listing
        assert sandbox.commands.run("python3 /home/user/app/main.py").stdout == "hi\n"
    finally:
        sandbox.kill()
    # Same files again: nothing uploaded or built anew.
    logs: list[str] = []
    Template.build(template, name, on_build_logs=lambda e: logs.append(e.message))
    assert sum("CACHED" in line for line in logs) == 2, logs


def test_copy_with_tampered_upload_is_refused(own_templates: Path, tmp_path: Path) -> None:
    import httpx

    context = tmp_path / "ctx"
    context.mkdir()
    (context / "a.txt").write_text("real\n")
    template = Template(file_context_path=str(context)).from_template("base").copy("a.txt", "/opt/a.txt")
    name = f"t-{uuid.uuid4().hex[:8]}"
    Template.build(template, name)  # uploads the real files
    # Replace the stored upload with other bytes under the same hash: the build must notice.
    stored = next((own_templates / "uploads").glob("*.tar"))
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("a.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"fake\n"))
    stored.write_bytes(buffer.getvalue())
    with pytest.raises(BuildException, match="file hash mismatch"):
        Template.build(template, f"{name}-2")
    assert (
        httpx.put(f"{__import__('os').environ['E2B_API_URL']}/templates/x/files/{'0' * 64}/upload").status_code == 401
    )


def test_start_command_runs_at_create_and_create_waits_for_the_ready_command(own_templates: Path) -> None:
    from e2b import wait_for_file

    name = f"t-{uuid.uuid4().hex[:8]}"
    template = (
        Template()
        .from_template("base")
        .set_start_cmd(
            "sleep 2; echo started-by-$(whoami) > /tmp/ready-marker; sleep infinity", wait_for_file("/tmp/ready-marker")
        )
    )
    Template.build(template, name)
    sandbox = Sandbox.create(template=name, timeout=60)
    try:
        # Create returned only once the ready command succeeded: the marker is there at once.
        assert sandbox.files.read("/tmp/ready-marker").strip() == "started-by-user"
    finally:
        sandbox.kill()


def test_delete_is_refused_while_in_use_and_for_built_ins(own_templates: Path) -> None:
    import os

    import httpx

    name = f"t-{uuid.uuid4().hex[:8]}"
    Template.build(Template().from_template("base").run_cmd("true"), name)
    url, key = os.environ["E2B_API_URL"], {"X-API-KEY": os.environ["E2B_API_KEY"]}
    sandbox = Sandbox.create(template=name, timeout=60)
    try:
        refused = httpx.delete(f"{url}/templates/{name}", headers=key)
        assert refused.status_code == 409, refused.text
    finally:
        sandbox.kill()
    assert httpx.delete(f"{url}/templates/base", headers=key).status_code == 400
    assert httpx.delete(f"{url}/templates/{name}", headers=key).status_code == 204
    assert Template.exists(name) is False
    assert httpx.delete(f"{url}/templates/{name}", headers=key).status_code == 404


def test_from_base_image_builds_on_the_base_template(own_templates: Path) -> None:
    name = f"t-{uuid.uuid4().hex[:8]}"
    Template.build(Template().from_base_image().run_cmd("echo on-base > /home/user/b.txt"), name)
    sandbox = Sandbox.create(template=name, timeout=60)
    try:
        assert sandbox.files.read("/home/user/b.txt").strip() == "on-base"
    finally:
        sandbox.kill()
