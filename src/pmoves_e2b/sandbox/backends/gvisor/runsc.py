"""The only module that runs ``runsc`` (gVisor, Debian's 2022 build).

Every call has a timeout (a failing runsc can hang) and the same global flags: the ptrace
platform (KVM here is PVM, systrap is newer than this build), gVisor's own network stack
(netstack: the sentry takes over the sandbox netns's veth, with its address and routes, and
sends raw frames on it, so the host's nftables rules on the other end apply as under ns; with
the host network mode instead, `runsc checkpoint` refuses) and no cgroups of its own (the
backend puts runsc into the sandbox's groups before it starts). runsc's control socket is an
abstract unix socket, which belongs to a network namespace, so every call runs inside the
sandbox's netns; from elsewhere a running sandbox looks "stopped".

This build refuses netstack "in the root network namespace", which it tells by
/proc/sys/net/core/rmem_default existing after joining the netns to copy; this kernel has that
file in every netns. ``start`` runs runsc in a private mount namespace (inside the sandbox's
netns, whose /proc/sys/net entries are its own) with an empty tmpfs over /proc/sys/net/core:
nothing else reads it there, and the sandbox's netns is not the root one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pmoves_e2b.sandbox.backends.base import BackendError
from pmoves_e2b.sandbox.backends.gvisor import reaper

RUNSC = "runsc"
GLOBAL_FLAGS = ("--platform=ptrace", "--network=sandbox", "--ignore-cgroups")
TIMEOUT_S = 30.0
# Joins the sandbox's cgroups (their cgroup.procs files are $1..$4), then execs runsc, so the
# sentry, the gofer and every stub process are accounted there from their first instruction;
# runs under ``unshare -m`` in the sandbox's netns (private propagation), see the module's doc.
JOIN = (
    'for f in "$1" "$2" "$3" "$4"; do echo $$ > "$f"; done; shift 4; ulimit -c 0; '
    "mount -t tmpfs -o size=4k,mode=0555 none /proc/sys/net/core || exit 125; "
    'exec "$@"'
)


class RunscError(BackendError):
    """runsc failed or did not answer in time."""


def probe() -> str | None:
    """None when this host can run gVisor sandboxes, else why not (for the tier registry)."""
    path = shutil.which(RUNSC)
    if path is None:
        return "runsc is not on PATH (apt-get install runsc)"
    if os.geteuid() != 0:
        return "needs root (runsc, namespaces, cgroups, nftables)"
    try:
        done = subprocess.run([path, "--version"], capture_output=True, timeout=10, check=False)
    except subprocess.TimeoutExpired:
        return "runsc --version did not answer within 10 s"
    if done.returncode != 0:
        return f"runsc --version failed: {done.stderr.decode(errors='replace').strip()[:200]}"
    return None


def _argv(root: Path, *args: str) -> list[str]:
    return [RUNSC, f"--root={root}", *GLOBAL_FLAGS, *args]


def _in_netns(netns_path: Path, argv: list[str]) -> list[str]:
    return ["/usr/bin/nsenter", f"--net={netns_path}", "--", *argv]


@contextlib.contextmanager
def _deadline(proc: subprocess.Popen[bytes], timeout: float, what: str) -> Iterator[None]:
    """Kill ``proc``'s process group at the timeout. Waiting inside needs no timeout of its own, so
    it does not poll (Popen.wait(timeout) sleeps in steps of up to 50 ms)."""
    timed_out = threading.Event()

    def expire() -> None:
        timed_out.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    timer = threading.Timer(timeout, expire)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
    if timed_out.is_set():
        raise RunscError(f"{what} did not finish within {timeout:.0f} s (killed)")


def call(root: Path, netns_path: Path, *args: str, timeout: float = TIMEOUT_S) -> str:
    """``runsc <args>`` in the sandbox's netns; its stdout, or RunscError with its stderr."""
    proc = subprocess.Popen(
        _in_netns(netns_path, _argv(root, *args)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    with _deadline(proc, timeout, f"runsc {args[0]}"):
        stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RunscError(f"runsc {' '.join(args)} failed (rc {proc.returncode}): {_last_line(stderr)}")
    return stdout.decode(errors="replace")


def start(
    root: Path,
    netns_path: Path,
    bundle: Path,
    container_id: str,
    procs: tuple[Path, ...],
    log_fd: int,
    *,
    restore_from: Path | None = None,
    timeout: float = TIMEOUT_S,
) -> None:
    """``runsc run --detach`` (or ``restore --detach`` of a checkpoint image) inside the cgroups
    ``procs`` and the netns, under a subreaper of its own (``reaper.py``: the sentry and gofer it
    leaves are reaped as soon as they end); returns once the sandbox runs. Its stdout/stderr go to
    ``log_fd``."""
    command = ["run"] if restore_from is None else ["restore", f"--image-path={restore_from}"]
    argv = _argv(root, *command, "--detach", f"--bundle={bundle}", container_id)
    proc = subprocess.Popen(
        reaper.wrap(
            _in_netns(
                netns_path, ["/usr/bin/unshare", "-m", "--", "/bin/sh", "-c", JOIN, "sh", *map(str, procs), *argv]
            )
        ),
        stdin=subprocess.DEVNULL,
        stdout=log_fd,
        stderr=log_fd,
        start_new_session=True,  # the sandbox outlives this service (re-adopted after a restart)
    )
    with _deadline(proc, timeout, f"runsc {command[0]}"):
        proc.wait()
    if proc.returncode != 0:
        raise RunscError(f"runsc {command[0]} of {container_id} failed (rc {proc.returncode}); see envd.log")


def state(root: Path, netns_path: Path, container_id: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(call(root, netns_path, "state", container_id))
    return data


def checkpoint(root: Path, netns_path: Path, container_id: str, image_dir: Path) -> None:
    """Save the sandbox's whole state to ``image_dir``; the sandbox stops."""
    call(root, netns_path, "checkpoint", f"--image-path={image_dir}", container_id, timeout=120)


def shell(root: Path, netns_path: Path, container_id: str, script: str) -> str:
    """``script`` run by /bin/sh inside the sandbox (as root); its stdout."""
    return call(root, netns_path, "exec", container_id, "/bin/sh", "-c", script)


def delete(root: Path, netns_path: Path, container_id: str) -> None:
    call(root, netns_path, "delete", "--force", container_id)


def _last_line(stderr: bytes) -> str:
    """runsc's message: its last line, or the first one that says what failed (a failed checkpoint
    prints a Go stack after it)."""
    lines = [line for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    said = [line for line in lines if "failed" in line or "rejected" in line]
    text = said[0] if said else lines[-1] if lines else "(no output)"
    if "rejected" in text:  # the cause is at the end of a long dump of the object that was refused
        text = "save rejected" + text.rsplit("save rejected", 1)[-1]
    return text[-400:]
