"""The setup layer an image from a registry gets (imagesetup.py), on small image trees made here:
who `user` becomes, what it may do, and what happens without a shell. Written from the host,
so nothing of the image runs; the full path (registry, sandbox) is tests/compat/test_sdk_template_any_image.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pmoves_e2b.sandbox.templates.errors import TemplateBuildError
from pmoves_e2b.sandbox.templates.imagesetup import set_up_image


def _image(root: Path, passwd: str | None, *, usr_merged: bool = True, bash: bool = False) -> Path:
    bin_dir = root / ("usr/bin" if usr_merged else "bin")
    bin_dir.mkdir(parents=True)
    if usr_merged:
        (root / "bin").symlink_to("usr/bin")
    (bin_dir / "sh").write_text("#!fake\n")
    (bin_dir / "sh").chmod(0o755)
    if bash:
        (bin_dir / "bash").write_text("#!fake\n")
        (bin_dir / "bash").chmod(0o755)
    if passwd is not None:
        (root / "etc").mkdir()
        (root / "etc/passwd").write_text(passwd)
        (root / "etc/group").write_text("root:x:0:\nnode:x:1000:\n")
        (root / "etc/shadow").write_text("root:*:19000:0:99999:7:::\n")
        (root / "etc/shadow").chmod(0o640)
    return root


def test_node_like_image_gets_user_on_the_next_free_uid(tmp_path: Path) -> None:
    image = _image(tmp_path / "image", "root:x:0:0:root:/root:/bin/sh\nnode:x:1000:1000::/home/node:/bin/sh\n")
    layer = tmp_path / "layer"
    layer.mkdir()
    log = set_up_image(image, layer)
    assert any("uid 1001" in line and "1000 belongs to another account" in line for line in log), log
    passwd = (layer / "etc/passwd").read_text().splitlines()
    assert passwd[:2] == ["root:x:0:0:root:/root:/bin/sh", "node:x:1000:1000::/home/node:/bin/sh"]
    assert passwd[2] == "user:x:1001:1001::/home/user:/bin/sh"
    assert (layer / "etc/group").read_text().splitlines()[-1] == "user:x:1001:"
    assert (layer / "etc/shadow").read_text().splitlines()[-1] == "user:!:::::::"
    assert oct((layer / "etc/shadow").stat().st_mode & 0o777) == "0o640"  # the image's mode kept
    home = layer / "home/user"
    assert (home.stat().st_uid, home.stat().st_gid) == (1001, 1001)
    assert (layer / "etc/sudoers.d/user").read_text() == "user ALL=(ALL:ALL) NOPASSWD: ALL\n"
    # no bash: a stand-in where /bin points (usr/bin), not a /bin dir that would hide the image's link
    assert not (layer / "bin").exists()
    assert (layer / "usr/bin/bash").read_text() == '#!/bin/sh\nexec /bin/sh "$@"\n'
    assert os.access(layer / "usr/bin/bash", os.X_OK)
    # the mount points a sandbox needs, where the image had none
    assert oct((layer / "tmp").stat().st_mode & 0o7777) == "0o1777"
    assert (layer / "proc").is_dir() and (layer / "root").is_dir()


def test_image_with_its_own_user_and_bash_is_left_alone(tmp_path: Path) -> None:
    image = _image(
        tmp_path / "image",
        "root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/bash\n",
        usr_merged=False,
        bash=True,
    )
    for path in ("home/user", "tmp", "proc", "sys", "dev", "root", "run"):
        (image / path).mkdir(parents=True)
    layer = tmp_path / "layer"
    layer.mkdir()
    log = set_up_image(image, layer)
    assert log == ["the image has user 'user' (uid 1000); sandboxes run as it"]
    assert sorted(str(p.relative_to(layer)) for p in layer.rglob("*")) == [
        "etc",
        "etc/sudoers.d",
        "etc/sudoers.d/user",
    ]


def test_an_image_without_etc_gets_root_and_user(tmp_path: Path) -> None:
    image = _image(tmp_path / "image", None, usr_merged=False)
    layer = tmp_path / "layer"
    layer.mkdir()
    set_up_image(image, layer)
    assert (layer / "etc/passwd").read_text() == "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n"
    assert (layer / "etc/group").read_text() == "root:x:0:\nuser:x:1000:\n"
    assert (layer / "bin/bash").is_file()


def test_an_image_without_a_shell_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "image"
    (image / "etc").mkdir(parents=True)
    layer = tmp_path / "layer"
    layer.mkdir()
    with pytest.raises(TemplateBuildError, match="the image has no /bin/sh"):
        set_up_image(image, layer)
    assert list(layer.iterdir()) == []
