"""Per-template envd zygotes: a cold sandbox's envd is forked, not started (envd/zygote.py).

    zygotes = Zygotes(seccomp.bpf_pipe)
    layers = zygotes.layers_for(template.layers)     # None: this template starts envd cold
    ok = zygotes.fork_envd(layers, pid1=..., netns_path=..., procs=..., log_path=..., alive=fd, config={...})

A zygote is one process per (envd layer, os layer) pair: ``unshare --mount`` with the two layers
as a read-only overlay pivoted to ``/`` (nothing else of the host is mounted there, so it pins no
sandbox's mounts), running the template's own launcher with ``ENVD_ZYGOTE`` set. It runs as host
root (it must join each sandbox's netns and cgroups), so it is only ever made of the layers we
build (``envd-*`` over ``os-*``, the envd layer knowing the zygote); any other template starts envd
the old way. It sees nothing of a sandbox but fds; the sandbox's config, secrets included, goes in
a pipe that only the forked child reads. A zygote that fails or dies costs nothing but speed: the
launcher inside starts envd itself when no envd arrives.
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MOUNTPOINT = Path("/run/pmoves-e2b/zygote")  # each zygote mounts its own view here, in its own namespace
ZYGOTE_SOURCE = "opt/pmoves/site/pmoves_e2b/envd/zygote.py"  # an envd layer that can be a zygote has it
LAUNCHER_DIR = "opt/pmoves"  # envd, its site and its launcher: only the envd layer may provide them
START_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 10.0  # one fork and a few syscalls; more means the zygote is stuck
RETRY_AFTER_S = 60.0  # a zygote that failed to start is not tried again before this
# Mount the two layers, make them the root of this mount namespace and drop every other mount
# (umount reads /proc/self/mountinfo: a proc first; what is left is the overlay and that proc).
PIVOT = (
    'mount -t overlay overlay -o "ro,lowerdir=$1" "$2" && cd "$2" && pivot_root . . '
    '&& mount -t proc proc /proc && umount -l / && unset OLDPWD && shift 2 && exec "$@"'
)


@dataclass
class _Zygote:
    proc: subprocess.Popen[bytes]
    sock: socket.socket
    lock: threading.Lock = field(default_factory=threading.Lock)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        self.sock.close()  # its loop ends at EOF
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Zygotes:
    def __init__(self, seccomp_pipe: Callable[[], int], argv: Sequence[str], env: dict[str, str]) -> None:
        self._seccomp_pipe = seccomp_pipe
        self._argv = tuple(argv)
        self._env = dict(env)
        self._zygotes: dict[tuple[str, str], _Zygote] = {}
        self._failed: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    @staticmethod
    def layers_for(layers: Sequence[str]) -> tuple[str, str] | None:
        """The (envd, os) layers a zygote is made of, when the template ends in exactly those."""
        if len(layers) < 2:
            return None
        envd, os_layer = Path(layers[-2]), Path(layers[-1])
        if not (envd.name.startswith("envd-") and os_layer.name.startswith("os-")):
            return None
        if not (envd / ZYGOTE_SOURCE).is_file():
            return None  # an envd layer built before zygotes
        if any((Path(layer) / LAUNCHER_DIR).exists() for layer in layers[:-2]):
            return None  # a layer above replaces envd or its launcher (e.g. the isolation tests' agent)
        return str(envd), str(os_layer)

    def fork_envd(
        self,
        layers: tuple[str, str],
        *,
        pid1: int,
        netns_path: str,
        procs: Sequence[Path],
        log_path: Path,
        alive: int,
        config: dict[str, Any],
    ) -> bool:
        """Ask the zygote for this sandbox's envd; False when it could not (the launcher starts one)."""
        zygote = self._get(layers)
        if zygote is None:
            return False
        fds: list[int] = []
        try:
            fds.append(os.pidfd_open(pid1))
            fds.append(os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC))
            fds.extend(os.open(path, os.O_WRONLY | os.O_CLOEXEC) for path in procs)
            fds.append(os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC))
            fds.append(os.dup(alive))
            config_r, config_w = os.pipe2(os.O_CLOEXEC)
            fds.append(config_r)
            try:
                os.write(config_w, json.dumps(config).encode())  # a few hundred bytes: the pipe holds them
            finally:
                os.close(config_w)
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            log.warning("envd zygote request not made (envd starts cold): %s", exc)
            return False
        try:
            with zygote.lock:
                socket.send_fds(zygote.sock, [b"f"], fds)
                status = zygote.sock.recv(1)
        except OSError as exc:  # a zygote that hangs or died: the next create starts a new one
            log.warning("envd zygote request failed (envd starts cold): %s", exc)
            zygote.proc.kill()
            return False
        finally:
            for fd in fds:
                os.close(fd)
        if status != b"o":
            log.warning("envd zygote could not fork an envd (answer %r); envd starts cold", status)
            return False
        return True

    def pids(self) -> list[int]:
        """Host pids of the running zygotes."""
        with self._lock:
            return [zygote.proc.pid for zygote in self._zygotes.values() if zygote.alive()]

    def close(self) -> None:
        with self._lock:
            zygotes, self._zygotes = list(self._zygotes.values()), {}
        for zygote in zygotes:
            zygote.stop()

    def _get(self, layers: tuple[str, str]) -> _Zygote | None:
        with self._lock:
            zygote = self._zygotes.get(layers)
            if zygote is not None and zygote.alive():
                return zygote
            if zygote is not None:
                zygote.stop()
                del self._zygotes[layers]
            if time.monotonic() < self._failed.get(layers, 0.0):
                return None
            try:
                zygote = self._start(layers)
            except OSError as exc:
                log.warning("envd zygote for %s did not start (envd starts cold): %s", layers[0], exc)
                self._failed[layers] = time.monotonic() + RETRY_AFTER_S
                return None
            self._zygotes[layers] = zygote
            return zygote

    def _start(self, layers: tuple[str, str]) -> _Zygote:
        MOUNTPOINT.mkdir(mode=0o700, parents=True, exist_ok=True)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        seccomp_fd = self._seccomp_pipe()
        argv = [
            "/usr/bin/unshare", "--mount", "--propagation", "private", "--",
            "/bin/sh", "-c", PIVOT, "sh", ":".join(layers), str(MOUNTPOINT), *self._argv,
        ]  # fmt: skip
        env = {**self._env, "ENVD_ZYGOTE": str(theirs.fileno()), "ENVD_ZYGOTE_SECCOMP_FD": str(seccomp_fd)}
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(), seccomp_fd),
                env=env,
                start_new_session=True,
            )
        finally:
            theirs.close()
            os.close(seccomp_fd)
        ready, _, _ = select.select([ours], [], [], START_TIMEOUT_S)
        if not ready or ours.recv(1) != b"r":
            ours.close()
            proc.kill()
            proc.wait()
            raise OSError(f"no answer within {START_TIMEOUT_S:.0f}s (exit status {proc.returncode})")
        ours.settimeout(REQUEST_TIMEOUT_S)
        return _Zygote(proc, ours)
