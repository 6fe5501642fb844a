"""A program's xattr requests (program_xattrs.answer, as envd's xattr socket calls it) against envd's
store, on the host as root: a request reaches only the entry of the file it came with."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pmoves_e2b.envd import metadata_store
from pmoves_e2b.envd import program_xattrs as px

USER = 1000
NAME = b"user.e2b.owner"


@pytest.fixture()
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root: files of two owners")
    monkeypatch.setattr(metadata_store, "STORE", tmp_path / "store")
    monkeypatch.setattr(metadata_store, "_created", True)
    yield tmp_path


def _user() -> px.Caller:
    return px.Caller(fsuid=USER, fsgid=USER, groups=frozenset(), capabilities=0)


def _get(fd: int, caller: px.Caller) -> tuple[int, bytes]:
    return px.answer(px.Request(px.GET, 0, 100, NAME, b""), fd, caller)


def _roots_file_with_metadata(directory: Path) -> Path:
    victim = directory / "f"
    victim.write_text("root's")
    os.chmod(victim, 0o600)
    metadata_store.write(str(victim), {NAME.decode(): b"root"})
    return victim


def test_a_file_put_in_place_of_anothers_with_its_time_gets_none_of_its_xattrs(store: Path) -> None:
    shared = store / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    victim = _roots_file_with_metadata(shared)
    mtime_ns = victim.stat().st_mtime_ns
    # the user moves root's file aside and puts its own there, with the same time to the nanosecond
    victim.rename(shared / "aside")
    mine = shared / "f"
    mine.write_text("mine")
    os.chown(mine, USER, USER)
    os.utime(mine, ns=(mtime_ns, mtime_ns))
    fd = os.open(mine, os.O_PATH)
    try:
        with pytest.raises(px.XattrError) as caught:
            _get(fd, _user())
        assert caught.value.code == errno.ENODATA
    finally:
        os.close(fd)
    # and envd's own reads (the SDK's get_info) say the same
    assert metadata_store.read(str(mine)) == {}


def test_a_directory_swapped_for_a_link_during_a_request_reaches_no_other_files_entry(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The swap lands right after the request's path was checked: any later look-up by path (the
    old store resolved the parent directory again) would go through the link."""
    roots = store / "roots"
    roots.mkdir()
    victim = _roots_file_with_metadata(roots)
    own = store / "d"
    own.mkdir()
    mine = own / "f"
    mine.write_text("mine")
    os.chown(mine, USER, USER)
    fd = os.open(mine, os.O_PATH)
    resolve = os.path.realpath

    def swapped(path: str, *args: object, **kwargs: object) -> str:
        if path == str(own) and not own.is_symlink():
            own.rename(store / "d.real")
            own.symlink_to(roots)
        return resolve(path, *args, **kwargs)  # type: ignore[call-overload, no-any-return]

    monkeypatch.setattr(os.path, "realpath", swapped)
    try:
        with pytest.raises(px.XattrError) as caught:
            _get(fd, _user())
        assert caught.value.code == errno.ENODATA
        px.answer(px.Request(px.SET, 0, 4, b"user.evil", b"pwnd"), fd, _user())
    finally:
        os.close(fd)
        monkeypatch.setattr(os.path, "realpath", resolve)
    assert metadata_store.read(str(victim)) == {NAME.decode(): b"root"}  # untouched
