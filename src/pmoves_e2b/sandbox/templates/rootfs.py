"""Run build commands inside a template rootfs, with no mount ever outliving the command.

Every command runs in its own mount and pid namespace (``unshare --mount --pid --fork``):
the overlay of the lower layers, /proc, the /dev rbind, /sys and the build tmpfs exist only
in that namespace, so they vanish with its last process even if the builder is killed.
Deleting a build directory is still checked against the host's mount table first: a tree
with a live /dev rbind inside must never be removed recursively.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from .errors import TemplateBuildError
from .hostconfig import BUILD_CONFIG_DIR, HOST_MOUNT_PREFIX, HostConfig

CHROOT_PATH = "/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Fresh mount, pid, uts and ipc namespaces (nothing in a build can rename the host);
# --kill-child ends the whole pid namespace when unshare dies.
PRIVATE_NAMESPACES = (
    "unshare",
    "--mount",
    "--pid",
    "--uts",
    "--ipc",
    "--fork",
    "--kill-child",
    "--propagation",
    "private",
)
_PR_SET_PDEATHSIG = 1


def die_with_builder(builder_pid: int) -> None:
    """preexec_fn (bound to the builder's pid): the child gets SIGKILL if the builder dies, so no
    build runs on orphaned. A builder killed between fork and prctl sends no death signal, so the
    child checks it still has its parent once the signal is armed."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != builder_pid:
        os.kill(os.getpid(), signal.SIGKILL)


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` in this process's mount namespace."""
    prefix = str(path.resolve()).rstrip("/")
    found = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return found


def path_in_root(root: Path, path: str) -> Path:
    """``path`` resolved as if ``root`` were ``/`` (absolute symlinks stay inside it)."""
    parts = [p for p in path.split("/") if p]
    current = root
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            current = current.parent if current != root else root
            continue
        candidate = current / part
        if candidate.is_symlink():
            hops += 1
            if hops > 40:
                raise TemplateBuildError(f"too many symlinks resolving {path} in {root}")
            target = str(candidate.readlink())
            parts = [p for p in target.split("/") if p] + parts
            if target.startswith("/"):
                current = root
            continue
        current = candidate
    return current


def remove_tree(path: Path) -> None:
    """``rm -r`` that refuses to descend into mounted file systems (a /dev rbind above all)."""
    if not path.exists() and not path.is_symlink():
        return
    live = mounts_under(path)
    if live:
        raise TemplateBuildError(f"refusing to delete {path}: still mounted there: {', '.join(live)}")
    shutil.rmtree(path)


def run_host(argv: Sequence[str], log: IO[str], *, env: Mapping[str, str] | None = None) -> None:
    """A build command on the host (debootstrap, pip --target, npm --prefix), logged."""
    log.write(f"$ {shlex.join(argv)}\n")
    log.flush()
    result = subprocess.run(
        argv,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        preexec_fn=functools.partial(die_with_builder, os.getpid()),
    )
    if result.returncode != 0:
        raise TemplateBuildError(f"{argv[0]} exited with {result.returncode}")


def run_private(script: str, log: IO[str]) -> None:
    """A bash script in a fresh mount + pid namespace: its mounts and processes die with it."""
    log.write(f"$ {script}\n")
    log.flush()
    argv = [*PRIVATE_NAMESPACES, "bash", "-euo", "pipefail", "-c", script]
    result = subprocess.run(
        argv,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        preexec_fn=functools.partial(die_with_builder, os.getpid()),
    )
    if result.returncode != 0:
        raise TemplateBuildError(f"build command exited with {result.returncode}")


def run_in_rootfs(
    command: str,
    *,
    target: Path,
    lowers: Sequence[Path],
    host: HostConfig,
    log: IO[str],
    env: Mapping[str, str] | None = None,
) -> None:
    """Run ``command`` (bash) as root chrooted into the build's view of the rootfs.

    Without ``lowers`` the rootfs is ``target`` itself. With ``lowers`` (topmost first) the
    view is an overlay: ``lowers`` read-only, every change written to ``target`` as an
    overlay upper dir, which later serves as a read-only layer of its own.
    """
    with tempfile.TemporaryDirectory(prefix="pmoves-build-") as scratch:
        config_dir = Path(scratch) / "config"
        config_dir.mkdir()
        (config_dir / "pip.conf").write_text(host.pip_conf)
        (config_dir / "npmrc").write_text(host.npmrc)
        (config_dir / "resolv.conf").write_bytes(host.resolv_conf)
        q = shlex.quote
        lines = []
        if lowers:
            root = Path(scratch) / "merged"
            work = target.parent / f"{target.name}.work"
            remove_tree(work)
            work.mkdir()
            root.mkdir()
            lowerdir = ":".join(str(p) for p in lowers)
            lines.append(
                f"mount -t overlay overlay -o {q(f'lowerdir={lowerdir},upperdir={target},workdir={work}')} {q(str(root))}"
            )
        else:
            root = target
            work = None
        r = q(str(root))
        lines += [
            f"mount -t proc proc {r}/proc",
            f"mount --rbind /dev {r}/dev && mount --make-rslave {r}/dev",
            f"mount -t sysfs -o ro sysfs {r}/sys",
            f"mount -t tmpfs -o mode=1777 tmpfs {r}/tmp",  # noqa: S108 - /tmp of the build rootfs
            f"mkdir -p {r}{BUILD_CONFIG_DIR} && mount --bind -o ro {q(str(config_dir))} {r}{BUILD_CONFIG_DIR}",
            f"if [ -f {r}/etc/resolv.conf ] && [ ! -L {r}/etc/resolv.conf ]; then "
            f"mount --bind {q(str(config_dir / 'resolv.conf'))} {r}/etc/resolv.conf; fi",
        ]
        for path in host.host_paths:
            inside = f"{r}{HOST_MOUNT_PREFIX}{path}"
            lines.append(f"mkdir -p {q(inside)} && mount --rbind -o ro {q(path)} {q(inside)}")
        variables = {
            "PATH": CHROOT_PATH,
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "DEBIAN_FRONTEND": "noninteractive",
            **host.pip_env,
            "PIP_CONFIG_FILE": f"{BUILD_CONFIG_DIR}/pip.conf",
            "PIP_NO_CACHE_DIR": "1",
            "PIP_ROOT_USER_ACTION": "ignore",
            "NPM_CONFIG_USERCONFIG": f"{BUILD_CONFIG_DIR}/npmrc",
            "NPM_CONFIG_UPDATE_NOTIFIER": "false",
            **(env or {}),
        }
        assignments = " ".join(q(f"{k}={v}") for k, v in variables.items())
        # `env` from PATH: images without /usr (busybox) have /bin/env only
        lines.append(f"chroot {r} env -i {assignments} /bin/bash -euo pipefail -c {q(command)}")
        try:
            run_private("\n".join(lines), log)
        finally:
            if work is not None:
                remove_tree(work)


def run_in_layers(
    command: str, layers: Sequence[str | Path], *, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` (bash, as root) in the rootfs the layers (topmost first) make up.

    Writes go to a throwaway tmpfs upper dir, as in a sandbox; the layers stay untouched.
    Used to verify built templates.
    """
    with tempfile.TemporaryDirectory(prefix="pmoves-verify-") as scratch:
        q = shlex.quote
        rw, root = f"{scratch}/rw", f"{scratch}/root"
        lowerdir = ":".join(str(p) for p in layers)
        script = "\n".join(
            [
                f"mkdir {q(rw)} {q(root)} && mount -t tmpfs tmpfs {q(rw)} && mkdir {q(rw)}/u {q(rw)}/w",
                f"mount -t overlay overlay -o {q(f'lowerdir={lowerdir},upperdir={rw}/u,workdir={rw}/w')} {q(root)}",
                f"mount -t proc proc {q(root)}/proc",
                f"mount --rbind /dev {q(root)}/dev && mount --make-rslave {q(root)}/dev",
                # its own /dev/shm, as in a sandbox: what runs there (envd's state) stays off the host's
                f"mount -t tmpfs -o mode=1777 tmpfs {q(root)}/dev/shm",  # noqa: S108 - the rootfs's own
                f"mount -t tmpfs -o mode=1777 tmpfs {q(root)}/tmp",  # noqa: S108 - /tmp of the build rootfs
                f"chroot {q(root)} /usr/bin/env -i PATH={CHROOT_PATH} HOME=/root LANG=C.UTF-8 /bin/bash -c {q(command)}",
            ]
        )
        argv = [*PRIVATE_NAMESPACES, "bash", "-eu", "-c", script]
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            preexec_fn=functools.partial(die_with_builder, os.getpid()),
        )
