"""Custom templates built with the stock SDK's Template().build against a real stack."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from compat.private_templates import private_templates_stack
from e2b import Sandbox, Template
from e2b.exceptions import BuildException
from templates.template_cli import template_cli

pytestmark = pytest.mark.stack


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
    with pytest.raises(BuildException, match="invalid image name"):
        Template.build(Template().from_image("Not An Image").run_cmd("true"), "child-y")
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


def test_run_as_a_user_the_template_lacks_fails_with_e2bs_words(own_templates: Path) -> None:
    template = Template().from_template("base").run_cmd("whoami", user="root123")
    expected = "failed to run command 'whoami': command failed: unauthenticated: invalid username: 'root123'"
    with pytest.raises(BuildException) as failed:
        Template.build(template, f"t-{uuid.uuid4().hex[:8]}")
    assert expected in str(failed.value)


def test_copy_keeps_symlinks_as_links_wherever_they_point(own_templates: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ctx" / "folder"
    folder.mkdir(parents=True)
    (folder / "test.txt").write_text("hello\n")
    (folder / "relative.txt").symlink_to("test.txt")
    (folder / "absolute.txt").symlink_to(folder / "test.txt")  # a path of this machine, as E2B keeps it
    (folder / "dangling.txt").symlink_to("12345test.txt")
    name = f"t-{uuid.uuid4().hex[:8]}"
    template = Template(file_context_path=str(tmp_path / "ctx")).from_template("base").copy("folder/*", "folder")
    Template.build(template, name)
    sandbox = Sandbox.create(template=name, timeout=60)
    try:
        out = sandbox.commands.run(
            "cd folder && cat relative.txt && readlink relative.txt absolute.txt dangling.txt && "
            "stat -c %F absolute.txt dangling.txt"
        ).stdout.split("\n")
        assert out[:6] == ["hello", "test.txt", str(folder / "test.txt"), "12345test.txt", "symbolic link"] + [
            "symbolic link"
        ], out
    finally:
        sandbox.kill()


def test_an_upload_that_writes_through_a_symlink_is_refused(own_templates: Path, tmp_path: Path) -> None:
    """A hand-made archive (no SDK makes one): a link to /etc, then a file below it."""
    import io
    import os
    import tarfile

    import httpx

    from pmoves_e2b.sandbox.templates.custom import files_hash

    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        link = tarfile.TarInfo("ctx/escape")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc"
        tar.addfile(link)
        data = b"pwned\n"
        below = tarfile.TarInfo(f"ctx/escape/pmoves-{uuid.uuid4().hex[:8]}")
        below.size = len(data)
        tar.addfile(below, io.BytesIO(data))
    digest = files_hash(archive, "ctx", "/opt/ctx")
    url, key = os.environ["E2B_API_URL"], {"X-API-KEY": os.environ["E2B_API_KEY"]}
    name = f"t-{uuid.uuid4().hex[:8]}"
    link_answer = httpx.get(f"{url}/templates/{name}/files/{digest}", headers=key).json()
    assert httpx.put(link_answer["url"], content=archive.read_bytes()).status_code == 200
    ids = httpx.post(f"{url}/v3/templates", json={"name": name}, headers=key).json()
    steps = [{"type": "COPY", "args": ["ctx", "/opt/ctx"], "filesHash": digest, "force": False}]
    started = httpx.post(
        f"{url}/v2/templates/{name}/builds/{ids['buildID']}", json={"fromTemplate": "base", "steps": steps}, headers=key
    )
    assert started.status_code == 400 and "through a symlink" in started.json()["message"], started.text
    assert not Path(f"/etc/{below.name.rsplit('/', 1)[1]}").exists()
    assert not (own_templates / f"{name}.json").exists()


def test_cli_delete_follows_the_apis_rules(stack_factory: Any, running_stack: Any, tmp_path: Path) -> None:
    import os
    import subprocess

    import httpx

    with private_templates_stack(stack_factory, running_stack, tmp_path / "templates") as (stack, templates):

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return template_cli(*args, env=stack.env, timeout=120)

        name = f"t-{uuid.uuid4().hex[:8]}"
        Template.build(Template().from_template("base").run_cmd("true"), name, tags=["default", "v2"])
        listed = cli("list")
        assert listed.returncode == 0 and name in listed.stdout, listed.stdout + listed.stderr
        sandbox = Sandbox.create(template=f"{name}:v2", timeout=60)
        try:
            for ref in (name, f"{name}:v2"):  # the template, and the tag its sandbox came from
                refused = cli("delete", ref)
                assert refused.returncode == 1 and "running or paused sandboxes" in refused.stderr, refused.stderr
            # another tag of it is free to go
            assert cli("delete", f"{name}:default").returncode == 0
        finally:
            sandbox.kill()
        url, key = os.environ["E2B_API_URL"], {"X-API-KEY": os.environ["E2B_API_KEY"]}
        assert [t["tag"] for t in httpx.get(f"{url}/templates/{name}/tags", headers=key).json()] == ["v2"]
        built_in = cli("delete", "base")
        assert built_in.returncode == 1 and "built in" in built_in.stderr
        assert (templates / "base.json").is_file()
        assert cli("delete", f"{name}:v2").returncode == 0  # its last tag: the template goes
        assert not (templates / f"{name}.json").exists() and not Template.exists(name)
        gone = cli("delete", name)
        assert gone.returncode == 1 and "not found" in gone.stderr
        bad = cli("delete", "../etc")
        assert bad.returncode == 1 and "invalid" in bad.stderr.lower(), bad.stderr
