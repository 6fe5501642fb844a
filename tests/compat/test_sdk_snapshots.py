"""E2B snapshots and forks through the stock `e2b` SDK (2.63.0) on the default `ns` tier.

Filesystem snapshots (``create_snapshot(mode="filesystem")``) work on every tier: new sandboxes
boot from the snapshot's files. Snapshots with memory (the SDK's default) and forks need a tier
that checkpoints; on `ns` they are a clear 400 naming the tier, and the sandbox runs on untouched.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2b import Sandbox
from e2b.exceptions import SandboxException

from tests.compat.private_templates import private_templates_stack

pytestmark = pytest.mark.stack


@pytest.fixture()
def own_templates(stack_factory: Any, running_stack: Any, tmp_path: Path) -> Any:
    with private_templates_stack(stack_factory, running_stack, tmp_path / "templates") as (stack, where):
        yield stack, where


def test_filesystem_snapshot_carries_files_to_new_sandboxes(own_templates: Any) -> None:
    _, templates = own_templates
    source = Sandbox.create(timeout=120)
    try:
        source.files.make_dir("/home/user/app")
        source.files.write("/home/user/app/config.json", '{"env": "test"}', metadata={"origin": "source"})
        source.commands.run("ln -s app/config.json /home/user/link && sudo rm /etc/hostname && mkfifo /tmp/fifo")
        source.commands.run(
            "sudo sh -c 'echo root-made > /opt/root.txt && rm -r /etc/apt && mkdir /etc/apt && touch /etc/apt/only'"
        )
        snapshot = source.create_snapshot(mode="filesystem")
        assert snapshot.snapshot_id and snapshot.names
        assert source.is_running()  # the source runs on after its snapshot
        source.files.write("/home/user/app/config.json", "changed after the snapshot")

        first = Sandbox.create(snapshot.snapshot_id, timeout=120)
        second = Sandbox.create(snapshot.snapshot_id, timeout=120)
        try:
            assert first.files.read("/home/user/app/config.json") == '{"env": "test"}'
            assert first.files.get_info("/home/user/app/config.json").metadata == {"origin": "source"}
            listing = first.commands.run(
                "readlink /home/user/link; stat -c '%U %a' /home/user/app/config.json /opt/root.txt;"
                " test -e /etc/hostname && echo hostname-back || echo hostname-gone; test -p /tmp/fifo && echo fifo"
            ).stdout.split("\n")
            assert listing[:5] == ["app/config.json", "user 644", "root 644", "hostname-gone", "fifo"], listing
            assert first.commands.run("ls -A /etc/apt").stdout.split() == ["only"]  # a replaced dir stays replaced
            # a sandbox made from it is its own: the other one does not see its writes
            first.files.write("/home/user/app/config.json", "first's")
            assert second.files.read("/home/user/app/config.json") == '{"env": "test"}'
            # ... and it can write where the source's user could (owners kept, not the host's)
            first.commands.run("echo more >> /home/user/app/config.json")
        finally:
            first.kill()
            second.kill()
        assert Sandbox.delete_snapshot(snapshot.snapshot_id) is True
        assert Sandbox.delete_snapshot(snapshot.snapshot_id) is False
        with pytest.raises(SandboxException, match="404"):
            Sandbox.create(snapshot.snapshot_id, timeout=60)
    finally:
        source.kill()
    assert not list((templates / "layers").glob(".tmp-*"))
    assert not list((templates / "layers").glob("snapshot-*"))  # deleted: its layer went with it


def test_named_snapshots_are_listed_by_sandbox_and_name_and_a_name_takes_the_newest(own_templates: Any) -> None:
    source = Sandbox.create(timeout=120)
    other = Sandbox.create(timeout=120)
    name = f"snap-{uuid.uuid4().hex[:8]}"
    try:
        source.files.write("/home/user/version.txt", "1")
        named = source.create_snapshot(name=name, mode="filesystem")
        assert named.snapshot_id == name and any(name in n for n in named.names)
        unnamed = other.create_snapshot(mode="filesystem")

        everything = {s.snapshot_id for s in Sandbox.list_snapshots().next_items()}
        assert {name, unnamed.snapshot_id} <= everything
        mine = [s.snapshot_id for s in Sandbox.list_snapshots(sandbox_id=source.sandbox_id).next_items()]
        assert mine == [name]
        assert [s.snapshot_id for s in Sandbox.list_snapshots(name=name).next_items()] == [name]
        assert Sandbox.list_snapshots(name=f"{name}-does-not-exist").next_items() == []

        source.files.write("/home/user/version.txt", "2")
        again = source.create_snapshot(name=name, mode="filesystem")
        assert again.snapshot_id == name
        fresh = Sandbox.create(name, timeout=60)
        try:
            assert fresh.files.read("/home/user/version.txt") == "2"
        finally:
            fresh.kill()
        Sandbox.delete_snapshot(unnamed.snapshot_id)
        Sandbox.delete_snapshot(name)
    finally:
        source.kill()
        other.kill()


def test_a_paused_sandbox_can_be_snapshotted_and_stays_paused(own_templates: Any) -> None:
    source = Sandbox.create(timeout=120)
    try:
        source.files.write("/home/user/note.txt", "written before the pause")
        source.pause()
        snapshot = Sandbox.create_snapshot(source.sandbox_id, mode="filesystem")
        assert not source.is_running()
        copy = Sandbox.create(snapshot.snapshot_id, timeout=60)
        try:
            assert copy.files.read("/home/user/note.txt") == "written before the pause"
        finally:
            copy.kill()
        Sandbox.delete_snapshot(snapshot.snapshot_id)
    finally:
        source.kill()


def test_memory_snapshots_and_forks_name_the_tier_that_cannot_take_them(own_templates: Any) -> None:
    _, templates = own_templates
    source = Sandbox.create(timeout=120)
    try:
        for call in (source.create_snapshot, source.fork):
            with pytest.raises(SandboxException, match="not supported by this sandbox's isolation tier 'ns'") as caught:
                call()
            assert "a filesystem-only snapshot (mode 'filesystem') works on this tier" in str(caught.value)
        assert source.is_running()
        assert source.commands.run("echo still here").stdout.strip() == "still here"
        assert not [p for p in templates.glob("snapshot-*.json")]
        assert not list((templates / "layers").glob("*snapshot-*"))
    finally:
        source.kill()


def test_bad_snapshot_requests_are_clear_errors(own_templates: Any) -> None:
    stack, _ = own_templates
    source = Sandbox.create(timeout=60)
    headers = {"X-API-Key": stack.sdk_env["E2B_API_KEY"]}
    url = stack.sdk_env["E2B_API_URL"]
    try:
        cases = [
            (f"/sandboxes/{source.sandbox_id}/snapshots", {"name": "Bad Name!", "memory": False}, 400, "invalid"),
            (f"/sandboxes/{source.sandbox_id}/snapshots", {"name": "base", "memory": False}, 409, "template"),
            (f"/sandboxes/{source.sandbox_id}/snapshots", {"memory": False, "ttl": 5}, 400, "ttl"),
            ("/sandboxes/nosuchsandbox/snapshots", {"memory": False}, 404, "nosuchsandbox"),
            (f"/sandboxes/{source.sandbox_id}/fork", {"count": 0}, 400, "count"),
            ("/sandboxes/nosuchsandbox/fork", {}, 404, "nosuchsandbox"),
        ]
        for path, body, status, words in cases:
            response = httpx.post(url + path, json=body, headers=headers, timeout=30)
            assert response.status_code == status, (path, body, response.text)
            assert words in response.json()["message"], response.text
        assert httpx.get(url + "/snapshots", params={"nextToken": "garbage"}, headers=headers).status_code == 400
        assert httpx.get(url + "/snapshots", params={"limit": 0}, headers=headers).status_code == 400
        assert httpx.get(url + "/snapshots").status_code == 401
        with pytest.raises(SandboxException):
            Sandbox.delete_snapshot("base")  # a built-in template is not a snapshot to delete
    finally:
        source.kill()
