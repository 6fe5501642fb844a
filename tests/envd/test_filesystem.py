"""files.* and watch_dir through the stock e2b SDK (sync and async) against a real envd."""

from __future__ import annotations

import io
import os
import pwd
import time
import uuid

import anyio
import pytest
from e2b import AsyncSandbox, InvalidArgumentException, NotFoundException, Sandbox
from e2b.sandbox.filesystem.filesystem import FileType
from e2b.sandbox.filesystem.watch_handle import FilesystemEventType
from e2b.sandbox_sync.filesystem.filesystem import WriteEntry

from envd.conftest import RunningEnvd


@pytest.fixture
def workdir(sandbox: Sandbox, home: str) -> str:
    path = f"{home}/fs-{uuid.uuid4().hex[:8]}"
    sandbox.files.make_dir(path)
    return path


def test_write_and_read_str_bytes_and_file_like(sandbox: Sandbox, workdir: str, envd: RunningEnvd) -> None:
    sandbox.files.write(f"{workdir}/text.txt", "héllo")
    sandbox.files.write(f"{workdir}/bin.dat", bytes(range(256)))
    sandbox.files.write(f"{workdir}/stream.dat", io.BytesIO(b"x" * 300_000))
    assert sandbox.files.read(f"{workdir}/text.txt") == "héllo"
    assert bytes(sandbox.files.read(f"{workdir}/bin.dat", format="bytes")) == bytes(range(256))
    streamed = b"".join(sandbox.files.read(f"{workdir}/stream.dat", format="stream"))
    assert streamed == b"x" * 300_000
    owner = pwd.getpwuid(os.stat(f"{workdir}/text.txt").st_uid).pw_name
    assert owner == envd.user


def test_write_creates_parent_dirs_owned_by_user(sandbox: Sandbox, workdir: str, envd: RunningEnvd) -> None:
    info = sandbox.files.write(f"{workdir}/a/b/c.txt", "deep")
    assert info.path == f"{workdir}/a/b/c.txt" and info.name == "c.txt"
    assert pwd.getpwuid(os.stat(f"{workdir}/a/b").st_uid).pw_name == envd.user


def test_relative_and_tilde_paths_resolve_under_home(sandbox: Sandbox, home: str) -> None:
    sandbox.files.write("relative-file.txt", "rel")
    assert sandbox.files.read("~/relative-file.txt") == "rel"
    assert os.path.exists(f"{home}/relative-file.txt")


def test_gzip_upload_and_download(sandbox: Sandbox, workdir: str) -> None:
    payload = b"compress me " * 10_000
    sandbox.files.write(f"{workdir}/g.bin", payload, gzip=True)
    assert bytes(sandbox.files.read(f"{workdir}/g.bin", format="bytes", gzip=True)) == payload


def test_write_many_files_in_one_request(sandbox: Sandbox, workdir: str) -> None:
    entries = [WriteEntry(path=f"{workdir}/many/{i}.txt", data=f"file {i}") for i in range(5)]
    infos = sandbox.files.write_files(entries)
    assert sorted(i.path for i in infos) == sorted(e["path"] for e in entries)
    assert sandbox.files.read(f"{workdir}/many/3.txt") == "file 3"


def test_metadata_round_trip(sandbox: Sandbox, workdir: str) -> None:
    info = sandbox.files.write(f"{workdir}/meta.txt", "m", metadata={"Owner-Team": "infra"})
    assert info.metadata == {"owner-team": "infra"}
    assert sandbox.files.get_info(f"{workdir}/meta.txt").metadata == {"owner-team": "infra"}


def test_overwriting_without_metadata_clears_it(sandbox: Sandbox, workdir: str) -> None:
    """Issue 12 item 8: the old metadata outlived an overwrite that sent none."""
    sandbox.files.write(f"{workdir}/over.txt", "v1", metadata={"stage": "draft"})
    sandbox.files.write(f"{workdir}/over.txt", "v2")
    assert not sandbox.files.get_info(f"{workdir}/over.txt").metadata
    assert sandbox.files.read(f"{workdir}/over.txt") == "v2"


def test_deep_list_is_a_name_sorted_depth_first_walk(sandbox: Sandbox, workdir: str) -> None:
    """Issue 12 item 8: like Go's filepath.WalkDir in E2B's envd: each directory, then its entries."""
    for path in ("b/z.txt", "a/y/deep.txt", "a/x.txt", "a-c.txt", "c.txt"):
        sandbox.files.write(f"{workdir}/walk/{path}", "1")
    listed = [e.path.removeprefix(f"{workdir}/walk/") for e in sandbox.files.list(f"{workdir}/walk", depth=3)]
    assert listed == ["a", "a/x.txt", "a/y", "a/y/deep.txt", "a-c.txt", "b", "b/z.txt", "c.txt"]


def test_list_exists_info_rename_remove(sandbox: Sandbox, workdir: str) -> None:
    sandbox.files.write(f"{workdir}/dir/inner/f.txt", "1")
    sandbox.files.write(f"{workdir}/top.txt", "22")
    names = {e.name: e for e in sandbox.files.list(workdir)}
    assert set(names) == {"dir", "top.txt"}
    assert names["dir"].type == FileType.DIR and names["top.txt"].size == 2
    deep = {e.path for e in sandbox.files.list(workdir, depth=3)}
    assert f"{workdir}/dir/inner/f.txt" in deep
    assert sandbox.files.exists(f"{workdir}/top.txt") and not sandbox.files.exists(f"{workdir}/none")
    info = sandbox.files.get_info(f"{workdir}/top.txt")
    assert (info.type, info.permissions, info.size) == (FileType.FILE, "-rw-r--r--", 2)
    moved = sandbox.files.rename(f"{workdir}/top.txt", f"{workdir}/moved/top2.txt")
    assert moved.path == f"{workdir}/moved/top2.txt"
    sandbox.files.remove(f"{workdir}/dir")
    assert not sandbox.files.exists(f"{workdir}/dir")


def test_symlink_reports_target_type(sandbox: Sandbox, workdir: str) -> None:
    sandbox.files.make_dir(f"{workdir}/real")
    os.symlink(f"{workdir}/real", f"{workdir}/link")
    info = sandbox.files.get_info(f"{workdir}/link")
    assert info.type == FileType.SYMLINK and info.symlink_target == f"{workdir}/real"


def test_make_dir_existing_returns_false(sandbox: Sandbox, workdir: str) -> None:
    assert sandbox.files.make_dir(f"{workdir}/new") is True
    assert sandbox.files.make_dir(f"{workdir}/new") is False


def test_errors_map_to_sdk_exceptions(sandbox: Sandbox, workdir: str) -> None:
    with pytest.raises(NotFoundException):
        sandbox.files.read(f"{workdir}/missing.txt")
    with pytest.raises(NotFoundException):
        sandbox.files.list(f"{workdir}/missing-dir")
    with pytest.raises(NotFoundException):
        sandbox.files.rename(f"{workdir}/missing", f"{workdir}/other")
    sandbox.files.write(f"{workdir}/plain.txt", "x")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.list(f"{workdir}/plain.txt")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.read(workdir)
    with pytest.raises(InvalidArgumentException):
        sandbox.files.write(f"{workdir}/plain.txt/child", "x")


def test_dotdot_paths_resolve_like_the_os(sandbox: Sandbox, workdir: str) -> None:
    sandbox.files.write(f"{workdir}/x/../y.txt", "dots")
    assert sandbox.files.read(f"{workdir}/y.txt") == "dots"
    assert not sandbox.files.exists(f"{workdir}/x")


def test_sync_watch_dir_recursive(sandbox: Sandbox, workdir: str) -> None:
    sandbox.files.make_dir(f"{workdir}/sub")
    handle = sandbox.files.watch_dir(workdir, recursive=True, include_entry=True)
    try:
        sandbox.files.write(f"{workdir}/sub/new.txt", "w")
        sandbox.files.remove(f"{workdir}/sub/new.txt")
        seen: list = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            seen += handle.get_new_events()
            kinds = {(e.name, e.type) for e in seen}
            if ("sub/new.txt", FilesystemEventType.REMOVE) in kinds:
                break
            time.sleep(0.05)
        assert ("sub/new.txt", FilesystemEventType.CREATE) in kinds
        assert ("sub/new.txt", FilesystemEventType.REMOVE) in kinds
    finally:
        handle.stop()


def test_one_write_of_a_new_file_gives_create_chmod_write(sandbox: Sandbox, workdir: str) -> None:
    """Issue 12 item 8: E2B's own suite counts exactly these three events for one files.write."""
    sandbox.files.make_dir(f"{workdir}/counted")
    handle = sandbox.files.watch_dir(f"{workdir}/counted")
    try:
        sandbox.files.write(f"{workdir}/counted/new.txt", "This file will be watched.")
        time.sleep(0.3)
        events = handle.get_new_events()
        assert [(e.name, e.type) for e in events] == [
            ("new.txt", FilesystemEventType.CREATE),
            ("new.txt", FilesystemEventType.CHMOD),
            ("new.txt", FilesystemEventType.WRITE),
        ]
    finally:
        handle.stop()


def test_watch_of_missing_dir_is_not_found(sandbox: Sandbox, workdir: str) -> None:
    with pytest.raises(NotFoundException):
        sandbox.files.watch_dir(f"{workdir}/nope")


@pytest.mark.anyio
async def test_async_watch_dir_streams_events(async_sandbox: AsyncSandbox, workdir: str) -> None:
    received: list = []
    got_write = anyio.Event()

    def on_event(event) -> None:  # type: ignore[no-untyped-def]
        received.append(event)
        if event.name == "deep/a.txt" and event.type == FilesystemEventType.WRITE:
            got_write.set()

    await async_sandbox.files.make_dir(f"{workdir}/deep")
    handle = await async_sandbox.files.watch_dir(workdir, on_event=on_event, recursive=True)
    try:
        await async_sandbox.files.write(f"{workdir}/deep/a.txt", "data")
        with anyio.fail_after(5):
            await got_write.wait()
    finally:
        await handle.stop()
    assert any(e.name == "deep/a.txt" and e.type == FilesystemEventType.CREATE for e in received)


@pytest.mark.anyio
async def test_async_files_round_trip(async_sandbox: AsyncSandbox, workdir: str) -> None:
    await async_sandbox.files.write(f"{workdir}/async.txt", "a")
    assert await async_sandbox.files.read(f"{workdir}/async.txt") == "a"
    assert [e.name for e in await async_sandbox.files.list(workdir)] == ["async.txt"]


def test_user_root_writes_root_owned_files(sandbox: Sandbox, workdir: str) -> None:
    sandbox.files.write(f"{workdir}/as-root.txt", "r", user="root")
    assert os.stat(f"{workdir}/as-root.txt").st_uid == 0
    assert sandbox.files.read(f"{workdir}/as-root.txt", user="root") == "r"


@pytest.mark.parametrize(
    "name", ["with space.txt", "ünïcödé-名前.txt", 'quote"d.txt', "semi;colon.txt", "percent%41.txt"]
)
def test_unusual_file_names_round_trip(sandbox: Sandbox, workdir: str, name: str) -> None:
    sandbox.files.write(f"{workdir}/{name}", name)
    assert sandbox.files.read(f"{workdir}/{name}") == name
    assert name in [e.name for e in sandbox.files.list(workdir)]


@pytest.mark.parametrize("name", ["with space.txt", "ünïcödé-名前.txt", "semi;colon.txt", "percent%41.txt"])
def test_unusual_names_in_multi_file_uploads(sandbox: Sandbox, workdir: str, name: str) -> None:
    # Multi-file uploads carry paths only as multipart filenames, which E2B's envd takes
    # literally (httpx writes '"' as %22, so such names arrive escaped there too).
    entries = [WriteEntry(path=f"{workdir}/multi/{name}", data="m"), WriteEntry(path=f"{workdir}/multi/x", data="x")]
    sandbox.files.write_files(entries)
    assert sandbox.files.read(f"{workdir}/multi/{name}") == "m"
