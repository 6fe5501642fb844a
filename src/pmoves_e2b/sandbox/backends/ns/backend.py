"""The default isolation backend ("ns"): bubblewrap + idmapped overlayfs + cgroups + netns.

    backend = NsBackend(runtime_dir=data_dir / "sandboxes")
    handle = await backend.create(spec)      # returns once envd accepts TCP on handle.address:49983
    ...
    await backend.destroy(handle)

``NsBackend(runtime_dir, *, init_argv=ENVD_ARGV, pids_max=1024, ready_timeout=15.0)``:
- ``runtime_dir``: parent of the per-sandbox dirs ``<runtime_dir>/<sandbox_id>/`` (normally
  ``$E2B_DATA_DIR/sandboxes``). It is bind-mounted onto itself as a *shared* mount on first use so
  that the overlay, mounted after bwrap has cloned its mount namespace, propagates into it.
  Cgroup parents are named after it (``pmoves-e2b-<hash of runtime_dir>``), so several backends
  (the service, tests) never touch each other's sandboxes.
- ``init_argv``: the sandbox's first process (envd); started with ``ENVD_INIT_SECRET`` in its env.
- ``pids_max``: pids.max (and RLIMIT_NPROC) per sandbox.
- ``netns_reuse``: a destroyed sandbox's netns, cleaned, serves the next one (``network.recycle``).

What one sandbox is (recipe and measurements: reference/isolation-on-this-machine.md):
- a slot ``k`` from a host-wide registry (/run/pmoves-e2b/slots) gives root-inside the host uid
  range ``200000 + 65536*k`` and the routed /30 ``10.77.0.0/16 + 4k`` (see ``network.py``);
- ``/`` is an overlayfs: the template layers, idmapped into the sandbox's own user namespace,
  under an upper dir on its own disk (a sparse ext4 image of ``spec.disk_mb`` on a loop device), where envd's log is too;
- bwrap runs as host uid B in the sandbox's netns and cgroups (joined before exec, so the
  cgroup namespace is rooted at the sandbox's group) with new user/pid/mount/ipc/uts/cgroup
  namespaces, Docker's default capabilities, no_new_privs and the seccomp denylist;
- it runs in its own session and is not tied to this process: a restarted service re-adopts a
  handle (``is_alive``), and ``destroy`` reaps the launcher when it is our child.

What every netns tier shares (create's wait for envd, network options, teardown, cleanup, stats'
CPU) is ``NetnsBackend``'s (``netns_backend.py``); this module is the bubblewrap launch.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import select
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pmoves_e2b.sandbox.backends.base import (
    ENVD_PORT,
    BackendError,
    SandboxHandle,
    SandboxSpec,
    SandboxStats,
)
from pmoves_e2b.sandbox.backends.ns import cgroups, fsexport, hostlimits, mounts, network, seccomp
from pmoves_e2b.sandbox.backends.ns.cgroups import SandboxCgroups
from pmoves_e2b.sandbox.backends.ns.netns_backend import NetnsBackend, log_tail, write_json
from pmoves_e2b.sandbox.backends.ns.network import SandboxNet
from pmoves_e2b.sandbox.backends.ns.slots import UID_BASE, UID_RANGE, SlotRegistry
from pmoves_e2b.sandbox.backends.ns.zygote import Zygotes

ENVD_ARGV: tuple[str, ...] = ("/opt/pmoves/bin/envd", "--host", "0.0.0.0", "--port", str(ENVD_PORT))  # noqa: S104 - envd inside the sandbox's own netns
LAUNCH_ROOTS = Path("/run/pmoves-e2b/roots")
SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Docker's default set (0xa00405fb), by capability number; everything else is dropped from the bounding set.
CAPABILITIES = {
    "CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_FOWNER": 3, "CAP_FSETID": 4, "CAP_KILL": 5, "CAP_SETGID": 6,
    "CAP_SETUID": 7, "CAP_SETPCAP": 8, "CAP_NET_BIND_SERVICE": 10, "CAP_SYS_CHROOT": 18, "CAP_AUDIT_WRITE": 29,
    "CAP_SETFCAP": 31,
}  # fmt: skip
CAPABILITY_MASK = sum(1 << number for number in CAPABILITIES.values())
# envd's environment before its per-sandbox part (also the zygote's, which envd children inherit).
SANDBOX_ENV = {"PATH": SANDBOX_PATH, "HOME": "/root", "LANG": "C.UTF-8"}
# Runs as host root, inside the netns (forked by a thread that entered it), before setpriv: join the
# four cgroups so that bwrap and everything it starts are accounted from the first instruction, then
# lower rlimits (root here lacks CAP_SYS_RESOURCE, so they can only be set on the way down).
JOIN_AND_LIMIT = (
    'for f in "$1" "$2" "$3" "$4"; do echo $$ > "$f"; done; shift 4; '
    'ulimit -c 0; ulimit -n "$NOFILE"; ulimit -p "$NPROC"; unset NOFILE NPROC; exec "$@"'
)


class NsBackend(NetnsBackend):
    name = "ns"
    reuse_netns = True
    # The sandbox's network (veth, address, route) is configured while it launches; a subclass
    # whose launch copies that configuration (gVisor's netstack) waits for it, and its veth's
    # MACs are the same in every sandbox (a restored netstack keeps the ones it learnt).
    launch_after_network = False

    def __init__(
        self,
        runtime_dir: Path,
        *,
        init_argv: tuple[str, ...] = ENVD_ARGV,
        pids_max: int = 1024,
        ready_timeout: float = 15.0,
        slots: SlotRegistry | None = None,
        zygote: bool = True,
        netns_reuse: bool = True,
    ) -> None:
        super().__init__(runtime_dir, pids_max=pids_max, ready_timeout=ready_timeout, slots=slots, workers=32)
        self.reuse_netns = netns_reuse and type(self).reuse_netns  # a tier may never keep them
        self.init_argv = tuple(init_argv)
        self.launch_root = LAUNCH_ROOTS / self.runtime_tag
        # envd forked from a per-template zygote (zygote.py) when the sandbox runs the stock envd
        self.zygotes: Zygotes | None = None
        if zygote and self.init_argv == ENVD_ARGV:
            self.zygotes = Zygotes(seccomp.bpf_pipe, ENVD_ARGV, SANDBOX_ENV)

    # --- host setup -------------------------------------------------------------------------

    def _ensure_host_setup(self) -> None:
        with self._setup_lock:
            if self._host_ready:
                return
            self.runtime_dir.mkdir(parents=True, exist_ok=True)
            self.runtime_dir.chmod(0o711)
            if not mounts.is_shared_mountpoint(self.runtime_dir):
                mounts.mount(str(self.runtime_dir), self.runtime_dir, None, mounts.MS_BIND)
                mounts.mount("none", self.runtime_dir, None, mounts.MS_SHARED)
            # bwrap runs as host uid B and must walk to the overlay; the data dir's ancestors may be
            # private (0700), so it gets a peer of the runtime dir under world-searchable /run.
            if not mounts.is_shared_mountpoint(self.launch_root):
                for directory in (*reversed(self.launch_root.parents[:2]), self.launch_root):
                    directory.mkdir(mode=0o711, exist_ok=True)
                mounts.mount(str(self.runtime_dir), self.launch_root, None, mounts.MS_BIND)
            network.ensure_host_setup()
            hostlimits.lift_global_tables()
            seccomp.denylist_bpf()
            self._host_ready = True

    def close(self) -> None:
        """Undo the host setup of this runtime dir if no sandbox is left in it (tests, shutdown)."""
        if self.zygotes is not None:
            self.zygotes.close()
        self.drain_free_slots()
        with self._setup_lock:
            if self.runtime_dir.exists() and any(self.runtime_dir.iterdir()):
                return
            cgroups.remove_parents(cgroups.existing_parent_dirs(self.cgroup_parent_name))
            for mountpoint in (self.launch_root, self.runtime_dir):
                if mounts.is_shared_mountpoint(mountpoint):
                    mounts.umount(mountpoint)
            try:
                self.launch_root.rmdir()
            except FileNotFoundError:
                pass
            self._host_ready = False

    # --- the Backend interface (the rest is NetnsBackend's) ------------------------------------

    async def pause(self, handle: SandboxHandle) -> None:
        await self._in_thread(self._cgroups(handle).freeze, True)
        handle.state = "paused"

    async def resume(self, handle: SandboxHandle) -> None:
        await self._in_thread(self._cgroups(handle).freeze, False)
        handle.state = "running"

    async def export_filesystem(self, handle: SandboxHandle, dest: Path) -> None:
        """The sandbox's file changes as a new template layer at ``dest`` (it is paused meanwhile)."""
        upper = Path(handle.details["runtime_dir"]) / "rw" / "u"
        await self._in_thread(fsexport.export_upper, upper, dest, int(handle.details["uid_base"]), UID_RANGE)

    async def open_intercept(self, handle: SandboxHandle) -> socket.socket:
        net = SandboxNet.for_slot(int(handle.details["slot"]), handle.sandbox_id)
        return await self._in_thread(network.open_intercept, net)

    async def close_intercept(self, handle: SandboxHandle) -> None:
        net = SandboxNet.for_slot(int(handle.details["slot"]), handle.sandbox_id)
        await self._in_thread(network.close_intercept, net)

    # --- create ------------------------------------------------------------------------------

    def create_sync(self, spec: SandboxSpec) -> SandboxHandle:
        """``create`` for callers without an event loop (bench, scripts)."""
        handle = self._start(spec)
        try:
            asyncio.run(self._wait_ready(handle))
        except BaseException as exc:
            self._fail(handle.sandbox_id, handle.details, exc)
            raise
        return handle

    def _start(self, spec: SandboxSpec) -> SandboxHandle:
        """Everything up to envd's exec: validate, allocate, cgroups, network, mounts, launch."""
        self._check_spec(spec)
        if spec.memory_mb < 16 or spec.disk_mb < 1 or spec.cpu_count <= 0:
            raise BackendError("memory_mb must be >= 16, disk_mb >= 1 and cpu_count > 0")
        self._ensure_host_setup()

        sandbox_dir, details = self._new_sandbox_dir(spec.sandbox_id, 0o711)
        try:
            net, cg = self._new_sandbox(spec, details)
            slot = details["slot"]
            details["uid_base"] = UID_BASE + UID_RANGE * slot
            write_json(sandbox_dir / "state.json", details)
            # `ps` shows this path (bwrap's command line) to every local user: only the sandbox's
            # own host uid (bwrap binds m/ as it) and root may enter, so its files stay its own.
            os.chown(sandbox_dir, details["uid_base"], details["uid_base"])
            sandbox_dir.chmod(0o700)
            cgroups.cap_parent_pids(self.cgroup_parents, hostlimits.sandboxes_pids_max())
            cg.create(spec.memory_mb, spec.cpu_count, self.pids_max)
            cg.delegate(UID_BASE + UID_RANGE * slot)
            # the netns exists under its name before the launcher enters it; its setup inside may
            # go on while the launcher runs (envd is reachable only once both are done)
            if details["net_reused"]:
                network.take_free_netns(net)
                inside = _Background(network.apply_policy, net, spec.allow_internet)
            else:
                network.create_netns(net)
                inside = _Background(network.configure, net, spec.allow_internet, self.launch_after_network)
            try:
                if self.launch_after_network:
                    inside.result()
                self._launch(spec, details, sandbox_dir, cg, net)
            finally:
                inside.result()
            write_json(sandbox_dir / "state.json", details)
        except BaseException as exc:
            self._fail(spec.sandbox_id, details, exc)
            raise
        return SandboxHandle(
            sandbox_id=spec.sandbox_id,
            backend=self.name,
            address=net.address,
            init_secret=spec.init_secret,
            details=details,
        )

    def _launch(
        self, spec: SandboxSpec, details: dict[str, Any], sandbox_dir: Path, cg: SandboxCgroups, net: SandboxNet
    ) -> None:
        uid_base = details["uid_base"]
        merged, rw = sandbox_dir / "m", sandbox_dir / "rw"
        merged.mkdir()
        rw.mkdir(mode=0o700)
        mounts.mount_disk(sandbox_dir / "disk.img", rw, spec.disk_mb)
        upper, work = rw / "u", rw / "w"
        upper.mkdir()
        work.mkdir()
        os.chown(upper, uid_base, uid_base)
        upper.chmod(0o755)
        # The sandbox's own devpts instance (bwrap's has no max): its PTYs count against its own
        # max, not against the host-wide kernel.pty.max that every sandbox shares.
        pts = sandbox_dir / "pts"
        pts.mkdir()
        pts_options = f"newinstance,ptmxmode=0666,mode=620,max={hostlimits.PTYS_PER_SANDBOX}"
        mounts.mount("devpts", pts, "devpts", mounts.MS_NOSUID | mounts.MS_NOEXEC, pts_options)

        (sandbox_dir / "boot_id").write_text(f"{uuid.uuid4()}\n")
        info_r, info_w = os.pipe()
        block_r, block_w = os.pipe()
        seccomp_r = seccomp.bpf_pipe()
        nofile = min(65536, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
        # pids.max is the per-sandbox cap; RLIMIT_NPROC (per uid) only bounds a single user inside
        nproc = min(max(4096, self.pids_max), resource.getrlimit(resource.RLIMIT_NPROC)[1])
        caps = [arg for cap in CAPABILITIES for arg in ("--cap-add", cap)]
        argv = [
            "/bin/sh", "-c", JOIN_AND_LIMIT, "sh", *map(str, cg.procs_files()),
            "/usr/bin/setpriv", f"--reuid={uid_base}", f"--regid={uid_base}", "--clear-groups", "--",
            "/usr/bin/bwrap",
            "--unshare-user", "--uid", "0", "--gid", "0",
            "--info-fd", str(info_w), "--userns-block-fd", str(block_r), "--seccomp", str(seccomp_r),
            "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup",
            "--hostname", "e2b",
            "--bind", str(self.launch_root / spec.sandbox_id / "m"), "/", "--proc", "/proc", "--dev", "/dev",
            # its own boot id, as a machine of its own has (programs tell a reboot by it)
            "--ro-bind", str(self.launch_root / spec.sandbox_id / "boot_id"), "/proc/sys/kernel/random/boot_id",
            "--dev-bind", str(self.launch_root / spec.sandbox_id / "pts"), "/dev/pts",
            # its own cgroup2 group, delegated: envd puts each command in a child group
            "--bind", str(cg.unified), "/sys/fs/cgroup",
            # POSIX shared memory for every user (its pages count against the memory limit)
            "--perms", "1777", "--size", str(spec.memory_mb * 1024 * 1024 // 2), "--tmpfs", "/dev/shm",  # noqa: S108 - the sandbox's own /dev/shm
            "--cap-drop", "ALL", *caps,
            "--new-session", "--chdir", "/",
            "--", *self.init_argv,
        ]  # fmt: skip
        envd_env = {
            **SANDBOX_ENV,
            "ENVD_INIT_SECRET": spec.init_secret,
            "ENVD_PIDS_MAX": str(self.pids_max),
        }
        env = {**envd_env, "NOFILE": str(nofile), "NPROC": str(nproc)}
        zygote_layers = self.zygotes.layers_for(spec.template.layers) if self.zygotes is not None else None
        passed = [info_w, block_r, seccomp_r]
        forked: tuple[int, int] | None = None  # (ready read end, alive write end)
        if zygote_layers is not None:
            ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
            alive_r, alive_w = os.pipe2(os.O_CLOEXEC)
            forked = (ready_r, alive_w)
            for fd in (alive_r, ready_w):  # the launcher (dash) reopens them through /proc/self/fd
                os.fchown(fd, uid_base, uid_base)
            env["ENVD_FORKED_FD"] = f"{alive_r},{ready_w}"  # the launcher's side (definitions.py)
            passed += [alive_r, ready_w]
        log_path = rw / "envd.log"
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            # forked by a thread inside the sandbox's netns, which the launcher inherits: no exec of
            # nsenter (~1 ms of CPU per create)
            proc = network.in_netns(
                net.netns_path,
                lambda: subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log_fd,
                    stderr=log_fd,
                    pass_fds=passed,
                    env=env,
                    start_new_session=True,
                ),
                "launch",
            )
        except BaseException:
            for fd in forked or ():
                os.close(fd)
            raise
        finally:
            for fd in (log_fd, *passed):
                os.close(fd)
        self._children[spec.sandbox_id] = proc
        details["pid"] = proc.pid
        try:
            info = _read_until_eof(info_r, timeout=self.ready_timeout)
            if not info:
                raise BackendError(f"sandbox {spec.sandbox_id}: bwrap exited before creating the sandbox")
            child = int(json.loads(info)["child-pid"])
            details["child_pid"] = child
            for name in ("uid_map", "gid_map"):
                Path(f"/proc/{child}/{name}").write_text(f"0 {uid_base} {UID_RANGE}\n")
            userns = os.open(f"/proc/{child}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
            trees: list[int] = []
            try:
                for layer in spec.template.layers:
                    trees.append(mounts.idmapped_tree(layer, userns))
                lower = ":".join(f"/proc/self/fd/{tree}" for tree in trees)
                mounts.mount("overlay", merged, "overlay", 0, f"lowerdir={lower},upperdir={upper},workdir={work}")
            finally:
                for fd in (userns, *trees):
                    os.close(fd)
            os.write(block_w, b"1")  # bwrap continues: mounts, pivot_root, exec of the launcher
            if forked is not None and zygote_layers is not None:
                # the launcher runs (the sandbox is complete): fork its envd into it
                if _read_until_eof(forked[0], timeout=self.ready_timeout, limit=1) != b"x":
                    raise BackendError(f"sandbox {spec.sandbox_id}: its launcher did not start")
                self.zygotes.fork_envd(  # type: ignore[union-attr]
                    zygote_layers,
                    pid1=child,
                    netns_path=str(net.netns_path),
                    procs=cg.procs_files(),
                    log_path=log_path,
                    alive=forked[1],
                    config={
                        "env": {**envd_env, "PWD": "/"},
                        "uid": uid_base,
                        "rlimits": {"RLIMIT_CORE": 0, "RLIMIT_NOFILE": nofile, "RLIMIT_NPROC": nproc},
                        "capabilities": CAPABILITY_MASK,
                    },
                )
        finally:
            os.close(info_r)
            os.close(block_w)
            for fd in forked or ():
                os.close(fd)

    def _failure_logs(self, sandbox_dir: Path) -> str:
        return log_tail(sandbox_dir / "rw" / "envd.log", "envd log")

    # --- destroy / cleanup -------------------------------------------------------------------

    def _unmount(self, sandbox_dir: Path) -> None:
        mounts.unmount_sandbox(sandbox_dir)

    def _stop_processes(self, sandbox_id: str, details: dict[str, Any], cg: SandboxCgroups) -> None:
        if self._kill_init(cg, details.get("child_pid")):
            cg.wait_empty(timeout=1.0)
        if not cg.kill():
            raise BackendError(f"processes still in {cg.unified} after cgroup.kill")
        self._reap(sandbox_id, details.get("pid"))

    @staticmethod
    def _kill_init(cg: SandboxCgroups, child_pid: int | None) -> bool:
        """SIGKILL the sandbox's pid 1 first: the kernel ends its whole pid namespace and bwrap
        (its parent, outside) reaps it and exits, so no zombie is left to a lazy host init."""
        if child_pid is None or not cg.contains(child_pid):
            return False  # gone, or the pid now belongs to an unrelated process
        if cg.frozen():
            cg.freeze(False)  # bwrap must run to reap its child
        try:
            os.kill(child_pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True

    def _reap(self, sandbox_id: str, pid: int | None) -> None:
        """Collect the exited launcher if it is our child (ours, or re-parented to us)."""
        proc = self._children.pop(sandbox_id, None)
        if proc is not None:
            proc.wait()
            return
        if pid is None:
            return
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:  # gone: ENOENT once reaped, ESRCH if it exits while we read
            return
        if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid():
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass

    # --- stats -------------------------------------------------------------------------------

    def stats_sync(self, handle: SandboxHandle) -> SandboxStats:
        """CPU (``_cpu_used_pct``) and memory from the sandbox's cgroups; disk = its disk's file system."""
        cg = self._cgroups(handle)
        cpu_pct = self._cpu_used_pct(handle, cg)
        mem_used, mem_total = cg.memory_usage()
        disk = os.statvfs(Path(handle.details["runtime_dir"]) / "rw")
        disk_total = int(handle.details.get("disk_mb", 0)) * 1024 * 1024 or disk.f_blocks * disk.f_frsize
        return SandboxStats(
            cpu_count=float(handle.details.get("cpu_count", 1)),
            cpu_used_pct=cpu_pct,
            mem_used_bytes=mem_used,
            mem_total_bytes=mem_total,
            disk_used_bytes=min(disk_total, (disk.f_blocks - disk.f_bfree) * disk.f_frsize),
            disk_total_bytes=disk_total,
        )


class _Background:
    """Run a function in a plain thread (not the pool: a pooled worker waiting on the pool could
    deadlock it) and hand back its result or exception."""

    def __init__(self, func: Callable[..., Any], *args: Any) -> None:
        self._error: BaseException | None = None

        def run() -> None:
            try:
                func(*args)
            except BaseException as exc:  # noqa: BLE001 - re-raised by result()
                self._error = exc

        self._thread = threading.Thread(target=run, name="ns-backend-bg")
        self._thread.start()

    def result(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


def _read_until_eof(fd: int, timeout: float, limit: int = 0) -> bytes:
    """What ``fd`` yields until EOF (or until ``limit`` bytes, when set)."""
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    while not limit or sum(map(len, chunks)) < limit:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BackendError(f"bwrap did not report its child within {timeout:.0f}s")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    return b"".join(chunks)
