"""The guest's boot files and disks, built once and kept in a cache dir (``<data dir>/microvm``):

- the kernel: Debian's cloud kernel (``linux-image-cloud-amd64``), booted directly (no bootloader);
- the initramfs: busybox, its libraries, the virtio/erofs/overlay modules of that kernel and the
  scripts of ``guest.py``; per sandbox a second cpio with its config is appended (the kernel unpacks
  concatenated archives), so no secret is ever on a kernel command line the guest's users can read;
- one erofs image per template layer (layers are content-addressed and never change, so an image is
  made once per layer, shared by every template that has the layer);
- per sandbox: a sparse ext4 disk (the overlay's upper layer, so a full disk is ENOSPC in the guest).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pmoves_e2b.sandbox.backends.base import BackendError
from pmoves_e2b.sandbox.backends.microvm import guest

BOOT_DIR = Path("/boot")
BUSYBOX = Path("/usr/bin/busybox")
# Bump when the initramfs's contents change in a way its inputs' hash does not see.
INITRAMFS_VERSION = "1"


def find_kernel(boot_dir: Path = BOOT_DIR) -> tuple[Path, Path]:
    """(vmlinuz, modules dir) of the newest installed Debian cloud kernel."""
    kernels = sorted(boot_dir.glob("vmlinuz-*-cloud-amd64"), key=lambda p: p.stat().st_mtime)
    for kernel in reversed(kernels):
        release = kernel.name.removeprefix("vmlinuz-")
        modules = Path("/lib/modules") / release
        if modules.is_dir():
            return kernel, modules
    raise BackendError(
        "no Debian cloud kernel for microVMs: apt-get install -y qemu-system-x86 linux-image-cloud-amd64 erofs-utils busybox"
    )


@contextmanager
def locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of (path, mode, content) entries; directories have mode 0o040xxx."""
    out = io.BytesIO()

    def pad() -> None:
        out.write(b"\0" * (-out.tell() % 4))

    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        encoded = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        out.write(b"070701" + b"".join(b"%08X" % value for value in fields))
        out.write(encoded)
        pad()
        out.write(data)
        pad()
    out.write(b"\0" * (-out.tell() % 512))
    return out.getvalue()


def _shared_libraries(binary: Path) -> list[Path]:
    proc = subprocess.run(["ldd", str(binary)], capture_output=True, text=True)
    if "not a dynamic executable" in proc.stdout + proc.stderr:  # e.g. Debian's busybox-static
        return []
    if proc.returncode != 0:
        raise BackendError(f"ldd {binary} failed: {proc.stderr.strip()}")
    found = []
    for line in proc.stdout.splitlines():
        parts = line.split()
        for part in parts:
            if part.startswith("/"):
                found.append(Path(part))
                break
    return found


def initramfs(cache_dir: Path, modules_dir: Path) -> Path:
    """The shared initramfs (built once per kernel and guest scripts)."""
    libraries = _shared_libraries(BUSYBOX)
    inputs = hashlib.sha256(
        "\0".join(
            [INITRAMFS_VERSION, str(modules_dir), guest.INIT_SH, guest.PID1_PY, guest.PROBE_SH, *map(str, libraries)]
        ).encode()
        + BUSYBOX.read_bytes()
    ).hexdigest()[:16]
    target = cache_dir / f"initramfs-{inputs}.cpio"
    if target.exists():
        return target
    with locked(cache_dir):
        if target.exists():
            return target
        entries: list[tuple[str, int, bytes]] = []
        dirs = {"bin", "dev", "proc", "sys", "layers", "rw", "newroot", "lib", "lib/modules"}
        for library in libraries:
            dirs.update(str(parent).lstrip("/") for parent in library.parents if str(parent) != "/")
        for directory in sorted(dirs):
            entries.append((directory, 0o040755, b""))
        entries.append(("init", 0o100755, guest.INIT_SH.encode()))
        entries.append(("probe", 0o100755, guest.PROBE_SH.encode()))
        entries.append(("pmoves-init.py", 0o100644, guest.PID1_PY.encode()))
        entries.append(("bin/busybox", 0o100755, BUSYBOX.read_bytes()))
        for library in libraries:
            entries.append((str(library).lstrip("/"), 0o100755, library.read_bytes()))
        order = module_order(modules_dir, guest.MODULES)
        for name, path in order:
            entries.append((f"lib/modules/{name}.ko", 0o100644, path.read_bytes()))
        entries.append(("modules.order", 0o100644, "".join(f"{name}\n" for name, _ in order).encode()))
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(_cpio_newc(entries))
        tmp.replace(target)
    return target


def module_order(modules_dir: Path, wanted: tuple[str, ...]) -> list[tuple[str, Path]]:
    """(name, file) of ``wanted`` and what they need, each after its dependencies (modules.dep)."""
    deps: dict[str, tuple[Path, list[str]]] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        path, _, needs = line.partition(":")
        deps[_module_name(path)] = (modules_dir / path, [_module_name(need) for need in needs.split()])
    order: list[tuple[str, Path]] = []

    def add(name: str) -> None:
        if any(done == name for done, _ in order):
            return
        if name not in deps:
            raise BackendError(f"kernel module {name} not found in {modules_dir}")
        for need in deps[name][1]:
            add(need)
        order.append((name, deps[name][0]))

    for name in wanted:
        add(name)
    return order


def _module_name(path: str) -> str:
    return Path(path).name.split(".ko")[0]


def sandbox_initramfs(shared: Path, target: Path, config: dict[str, str]) -> None:
    """``shared`` with the sandbox's config appended (root-only file: it holds envd's init secret)."""
    lines = "".join(f"{key}='{value}'\n" for key, value in config.items())
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out, open(shared, "rb") as source:
        shutil.copyfileobj(source, out)
        out.write(_cpio_newc([("config", 0o100600, lines.encode())]))


def layer_image(cache_dir: Path, layer: Path) -> Path:
    """An erofs image of one template layer (made once; uids, modes, xattrs and overlay whiteouts kept)."""
    target = cache_dir / "layers" / f"{layer.name}.erofs"
    if target.exists():
        return target
    with locked(cache_dir):
        if target.exists():
            return target
        target.parent.mkdir(exist_ok=True)
        tmp = target.with_suffix(".tmp")
        proc = subprocess.run(["mkfs.erofs", "--quiet", str(tmp), str(layer)], capture_output=True, text=True)
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise BackendError(f"mkfs.erofs of layer {layer} failed: {proc.stderr.strip()}")
        tmp.replace(target)
    return target


def make_disk(path: Path, size_mb: int) -> None:
    """A sparse ext4 image of ``size_mb`` (the guest's writable layer)."""
    with open(path, "xb") as disk:
        disk.truncate(size_mb * 1024 * 1024)
    proc = subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1", str(path)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise BackendError(f"mkfs.ext4 of {path} failed: {proc.stderr.strip()}")


def overlay_disk(base: Path, target: Path) -> None:
    """A qcow2 disk whose unwritten blocks read from ``base`` (a snapshot's disk, never written again)."""
    proc = subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base), str(target)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise BackendError(f"qemu-img create of {target} failed: {proc.stderr.strip()}")
