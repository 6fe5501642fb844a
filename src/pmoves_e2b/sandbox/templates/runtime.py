"""envd's own runtime, for templates made from any OCI image.

envd is Python 3.11 with wheels built for it; an image may have another python, another libc
(musl), or neither (busybox, distroless). The ``runtime`` layer brings everything envd's process
needs under ``/opt/pmoves/runtime``: bookworm's python3.11 and its stdlib, taken from our ``os``
layer, the shared libraries it and envd's wheels link (glibc with them) and glibc's dynamic loader.
The launcher starts envd as ``<rt>/lib/ld-linux-x86-64.so.2 --inhibit-cache --library-path <rt>/lib
<rt>/bin/python3.11``: the loader named on the command line (not the image's ``/lib64`` one, which
may be missing or another glibc's), the library path an argument (not ``LD_LIBRARY_PATH``), so
nothing of the runtime reaches the processes envd starts: they exec the image's own programs.
The layer also replaces the envd layer's launcher and sudo shim (``#!/usr/bin/python3``) with ones
that run on the runtime. Built once per (os, envd) layer pair, content-addressed like every layer.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

from pmoves_e2b.envd import SETPRIV_ENV

from .definitions import ENVD_BIN, ENVD_SITE, PACKAGE_DIR, SUDO_SHIM, envd_launcher
from .errors import TemplateBuildError
from .rootfs import path_in_root
from .store import layer_bytes

RUNTIME_FORMAT = "runtime-1"  # bumped when the same inputs make a different layer
RUNTIME_DIR = "/opt/pmoves/runtime"
LOADER_NAME = "ld-linux-x86-64.so.2"
# Shell words that run envd's python; the stdlib is found next to the binary (<rt>/lib/python3.11).
RUNTIME_PYTHON = (
    f"{RUNTIME_DIR}/lib/{LOADER_NAME} --inhibit-cache --library-path {RUNTIME_DIR}/lib {RUNTIME_DIR}/bin/python3.11 -s"
)
# util-linux setpriv, which envd runs commands as another user with (``ENVD_SETPRIV``, envd/spawn.py)
RUNTIME_SETPRIV = RUNTIME_PYTHON.replace("bin/python3.11 -s", "bin/setpriv")
LAUNCHER_ENV = {SETPRIV_ENV: RUNTIME_SETPRIV}
SHIM_PATH = f"{RUNTIME_DIR}/sudo_shim.py"
# The shim runs as it does on our os layer: no site, no PYTHON* variables (its own header says -SE).
SUDO_WRAPPER = f'#!/bin/sh\nexec {RUNTIME_PYTHON} -SE {SHIM_PATH} "$@"\n'
# Not needed by envd; a third of the stdlib.
STDLIB_SKIPPED = frozenset(
    {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data", "config-3.11-x86_64-linux-gnu"}
)
LIB_DIRS = ("usr/lib/x86_64-linux-gnu", "usr/lib", "lib/x86_64-linux-gnu")
# dlopen()ed by glibc itself (thread cancellation and unwinding), so no DT_NEEDED names it.
ALWAYS = ("libgcc_s.so.1",)


def runtime_layer_id(os_layer: str, envd_layer: str) -> str:
    launcher = hashlib.sha256(envd_launcher(RUNTIME_PYTHON, LAUNCHER_ENV)).hexdigest()
    inputs = [RUNTIME_FORMAT, os_layer, envd_layer, launcher, SUDO_WRAPPER, sorted(STDLIB_SKIPPED), ALWAYS]
    return f"runtime-{hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:16]}"


def needed(path: Path) -> list[str]:
    """The DT_NEEDED names of an ELF64 little-endian file (none for anything else)."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return []
    phoff, phentsize, phnum = struct.unpack_from("<Q", data, 32)[0], *struct.unpack_from("<HH", data, 54)
    loads, dynamic = [], None
    for i in range(phnum):
        kind, _, offset, vaddr, _, filesz, _, _ = struct.unpack_from("<IIQQQQQQ", data, phoff + i * phentsize)
        if kind == 1:  # PT_LOAD
            loads.append((vaddr, offset, filesz))
        elif kind == 2:  # PT_DYNAMIC
            dynamic = (offset, filesz)
    if dynamic is None:
        return []
    names, strtab = [], 0
    for at in range(dynamic[0], dynamic[0] + dynamic[1], 16):
        tag, value = struct.unpack_from("<qQ", data, at)
        if tag == 0:
            break
        if tag == 1:  # DT_NEEDED
            names.append(value)
        elif tag == 5:  # DT_STRTAB (an address)
            strtab = next((value - v + o for v, o, size in loads if v <= value < v + size), 0)
    return [data[strtab + n : data.index(b"\0", strtab + n)].decode() for n in names]


def _find(os_root: Path, name: str) -> Path | None:
    for lib_dir in LIB_DIRS:
        found = path_in_root(os_root, f"/{lib_dir}/{name}")
        if found.is_file():
            return found
    return None


def build_runtime(os_root: Path, envd_root: Path, target: Path) -> list[str]:
    """Fill ``target`` (a new layer dir) from the os and envd layers; returns what it did, for the log."""
    rt = target / RUNTIME_DIR.lstrip("/")
    (rt / "bin").mkdir(parents=True)
    (rt / "lib").mkdir()
    python = path_in_root(os_root, "/usr/bin/python3.11")
    if not python.is_file():
        raise TemplateBuildError(f"the os layer {os_root.name} has no /usr/bin/python3.11 to run envd on")
    shutil.copy2(python, rt / "bin/python3.11")
    setpriv = path_in_root(os_root, "/usr/bin/setpriv")
    if not setpriv.is_file():
        raise TemplateBuildError(f"the os layer {os_root.name} has no /usr/bin/setpriv (util-linux)")
    shutil.copy2(setpriv, rt / "bin/setpriv")
    stdlib = path_in_root(os_root, "/usr/lib/python3.11")

    def skip(directory: str, names: list[str]) -> set[str]:
        # absolute symlinks (Debian's sitecustomize.py -> /etc/...) would point into the image
        return {n for n in names if n in STDLIB_SKIPPED or n.startswith("_test")} | {
            n for n in names if (Path(directory) / n).is_symlink() and str((Path(directory) / n).readlink())[:1] == "/"
        }

    shutil.copytree(stdlib, rt / "lib/python3.11", symlinks=True, ignore=skip)
    # The libraries python, its extension modules and envd's wheels link, transitively; the wheels'
    # own bundled libraries (auditwheel's *.libs dirs) stay in the envd layer.
    site = envd_root / ENVD_SITE.lstrip("/")
    bundled = {p.name for p in site.rglob("*.so*") if p.parent.name.endswith(".libs")}
    todo = [
        rt / "bin/python3.11",
        rt / "bin/setpriv",
        *(rt / "lib/python3.11/lib-dynload").glob("*.so"),
        *site.rglob("*.so"),
    ]
    wanted: dict[str, Path] = {}
    missing: set[str] = set()
    queue = [*ALWAYS]
    for binary in todo:
        queue += needed(binary)
    while queue:
        name = queue.pop()
        if name in wanted or name in bundled or name in missing or name == LOADER_NAME:
            continue
        found = _find(os_root, name)
        if found is None:
            missing.add(name)  # an extension module envd never imports (its library is not installed)
            continue
        wanted[name] = found
        queue += needed(found)
    for name in ("libc.so.6", *ALWAYS):
        if name not in wanted:
            raise TemplateBuildError(f"the os layer {os_root.name} has no {name} for envd's runtime")
    for name, source in wanted.items():
        shutil.copy2(source, rt / "lib" / name)
    loader = path_in_root(os_root, f"/lib64/{LOADER_NAME}")
    if not loader.is_file():
        raise TemplateBuildError(f"the os layer {os_root.name} has no /lib64/{LOADER_NAME}")
    shutil.copy2(loader, rt / "lib" / LOADER_NAME)
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "-j", "0", str(rt / "lib/python3.11")],
        check=False,
        capture_output=True,
    )
    # The launcher and the sudo shim of the envd layer, on the runtime's python.
    launcher = target / ENVD_BIN.lstrip("/")
    launcher.parent.mkdir(parents=True)
    launcher.write_bytes(envd_launcher(RUNTIME_PYTHON, LAUNCHER_ENV))
    launcher.chmod(0o755)
    shutil.copy2(PACKAGE_DIR / "envd/sudo_shim.py", rt / "sudo_shim.py")
    wrapper = target / SUDO_SHIM.lstrip("/")
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text(SUDO_WRAPPER)
    wrapper.chmod(0o755)
    size = layer_bytes(target)
    return [
        f"envd runtime: python3.11 + stdlib, setpriv, {len(wanted)} libraries and the loader from {os_root.name} "
        f"({size // 1024 // 1024} MB)"
    ]
