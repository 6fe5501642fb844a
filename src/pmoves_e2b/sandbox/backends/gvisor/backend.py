"""The gVisor isolation tier ("gvisor"): the ns backend's sandbox, with runsc instead of bwrap.

Everything but the launch is the ns backend's (``NsBackend``, whose pieces this reuses as they
are): the slot (host uid range and /30), the netns with its veth and nftables rules
(``ns/network.py``), the cgroups with their limits (``ns/cgroups.py``), the sandbox's own disk,
set_internet/egress/intercept, stats, pause (cgroup freezer), re-adoption and cleanup. What
differs, per sandbox in ``<runtime_dir>/<id>/``:

- ``m/`` is an overlayfs of the template's layers (not idmapped: gVisor's root is the sentry's,
  and the gofer, host root, serves the files) under an upper dir on the sandbox's own disk;
- ``bundle/config.json`` is the OCI config (``bundle.py``), ``runsc/`` runsc's state root;
- ``runsc run --detach`` (``runsc.py``) starts in the sandbox's netns with the host network mode,
  so envd listens on the sandbox's address exactly as in ns, and inside its cgroups, so the
  sentry, gofer and stub processes are what the memory, CPU and pids limits bound.

Syscalls of sandbox processes are served by gVisor's sentry (a user-space kernel, ptrace
platform), not by the host kernel: /proc/version, dmesg and the syscall surface are gVisor's.

``checkpoint`` saves the whole sandbox (memory, processes, gVisor's network stack) into an image
dir and stops it (its files stay in the upper dir); ``restore`` runs it again from the image,
in place; a create whose template has a ``restore_image`` restores that image instead of
booting (snapshots, forks, and a sandbox paused with memory, see lifecycle.py). gVisor's netstack
cannot save a TCP connection to outside the sandbox (loopback ones it keeps), TIME_WAIT included:
before a checkpoint the host gates new connections and waits, up to ``QUIET_WAIT_S``, until the
sandbox holds none (``quiesce.quiet``: recent TIME_WAITs are reopened and closed from the host).
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from pmoves_e2b.sandbox.backends.base import BackendError, SandboxHandle, SandboxLost, SandboxSpec
from pmoves_e2b.sandbox.backends.gvisor import bundle, quiesce, redirect, runsc, savable, shim
from pmoves_e2b.sandbox.backends.ns import fsexport, mounts, netlink, network
from pmoves_e2b.sandbox.backends.ns.backend import ENVD_ARGV, SANDBOX_ENV, NsBackend
from pmoves_e2b.sandbox.backends.ns.cgroups import SandboxCgroups
from pmoves_e2b.sandbox.backends.ns.network import SandboxNet
from pmoves_e2b.sandbox.backends.ns.slots import UID_RANGE, SlotRegistry

log = logging.getLogger(__name__)
READY_TIMEOUT_S = 30.0  # envd's Python start under ptrace takes ~1.3 s idle, many times that under load
# Under the ptrace platform one process inside costs the host 6-8 pids (its stub and the sentry's
# threads for it). The process limit is RLIMIT_NPROC inside (gVisor answers fork with EAGAIN, as
# under ns), and the host's pids.max sits above it: reaching that, or the memory limit (the OOM
# killer takes the sentry), ends the sandbox as a whole, since the sentry cannot survive a failed
# thread or stub creation (under ns only the offending process fails). Root inside is exempt from
# RLIMIT_NPROC. The host and other sandboxes carry on either way.
HOST_PIDS_PER_PROCESS = 12
REAP_WAIT_S = 5.0
# A connection the sandbox closed first keeps its end in TIME_WAIT for 60 s, and a checkpoint
# would fail on it (and end the sandbox): wait that long for them, no longer.
QUIET_WAIT_S = 65.0
SURVIVED_S = 2.0  # how long a sentry must outlive a failed save to count as alive


SAVED = "checkpointed"  # handle detail between a checkpoint and its restore
RESTORED_AT = "restored_at"  # handle detail: time.time() of the last restore in place
REDIRECT_PORT = "redirectPort"  # handle detail: the port of its egress redirect's listener (domain rules)
BOOT_ID = "boot_id"  # in the sandbox dir, and in a checkpoint image (a restore keeps the saved id)


class CheckpointRefused(BackendError):
    """The sandbox could not be saved (connections gVisor cannot save, a failed save it survived); it runs on."""


class CheckpointLost(SandboxLost):
    """runsc's save failed and took the sandbox with it (this runsc ends a sandbox it cannot save)."""


class GvisorBackend(NsBackend):
    name = "gvisor"
    # runsc used the netns (its sentry's host sockets live there): destroyed, never kept; reuse is
    # proven only where the sandbox's own processes were all that used it
    reuse_netns = False
    launch_after_network = True  # runsc copies the netns's eth0 (address, routes) when it starts

    def __init__(
        self,
        runtime_dir: Path,
        *,
        init_argv: tuple[str, ...] = ENVD_ARGV,
        pids_max: int = 1024,
        ready_timeout: float = READY_TIMEOUT_S,
        slots: SlotRegistry | None = None,
    ) -> None:
        super().__init__(
            runtime_dir,
            init_argv=init_argv,
            pids_max=pids_max * HOST_PIDS_PER_PROCESS + 64,  # the host's pids.max of the sandbox's cgroup
            ready_timeout=ready_timeout,
            slots=slots,
            zygote=False,
        )
        self.processes_max = pids_max  # processes inside, per user (RLIMIT_NPROC, ENVD_PIDS_MAX)

    def _ensure_host_setup(self) -> None:
        if not self._host_ready:
            super()._ensure_host_setup()
            quiesce.ensure_table()
            redirect.ensure_tables()

    def _launch(
        self, spec: SandboxSpec, details: dict[str, Any], sandbox_dir: Path, cg: SandboxCgroups, net: SandboxNet
    ) -> None:
        merged, rw = sandbox_dir / "m", sandbox_dir / "rw"
        merged.mkdir()
        rw.mkdir(mode=0o700)
        mounts.mount_disk(sandbox_dir / "disk.img", rw, spec.disk_mb)
        upper, work = rw / "u", rw / "w"
        upper.mkdir()
        work.mkdir()
        upper.chmod(0o755)
        shim.install(upper)
        savable.install(upper)
        lower = ":".join(spec.template.layers)
        mounts.mount("overlay", merged, "overlay", 0, f"lowerdir={lower},upperdir={upper},workdir={work}")
        env = {
            **SANDBOX_ENV,
            "ENVD_INIT_SECRET": spec.init_secret,
            "ENVD_PIDS_MAX": str(self.processes_max),
            savable.ENVD_ENV: "1",
        }
        nofile = min(65536, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
        bundle_dir = sandbox_dir / "bundle"
        config = bundle.config(merged, self.init_argv, env, spec.memory_mb, nofile, self.processes_max, net.netns_path)
        image = Path(spec.template.restore_image) if spec.template.restore_image else None
        # its own boot id, as under ns (gVisor has none): programs tell a reboot by it. A restore
        # is no reboot: it keeps the id of the sandbox that was saved (the checkpoint keeps a copy).
        saved_id = image / BOOT_ID if image is not None else None
        boot_id = saved_id.read_text() if saved_id is not None and saved_id.exists() else f"{uuid.uuid4()}\n"
        (sandbox_dir / BOOT_ID).write_text(boot_id)
        config["mounts"].append(
            {
                "destination": "/proc/sys/kernel/random/boot_id",
                "type": "bind",
                "source": str(sandbox_dir / BOOT_ID),
                "options": ["rbind", "ro"],
            }
        )
        bundle.write(bundle_dir, config)
        details.update(runsc_root=str(sandbox_dir / "runsc"), bundle=str(bundle_dir))
        self._run_runsc(spec.sandbox_id, details, cg, net, image)

    def _run_runsc(
        self, sandbox_id: str, details: dict[str, Any], cg: SandboxCgroups, net: SandboxNet, image: Path | None
    ) -> None:
        """``runsc run`` of the bundle, or ``runsc restore`` of ``image`` with it."""
        sandbox_dir = Path(details["runtime_dir"])
        log_fd = os.open(sandbox_dir / "rw" / "envd.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            runsc.start(
                Path(details["runsc_root"]),
                net.netns_path,
                Path(details["bundle"]),
                sandbox_id,
                cg.procs_files(),
                log_fd,
                restore_from=image,
                timeout=self.ready_timeout,
            )
        finally:
            os.close(log_fd)
        details["child_pid"] = int(runsc.state(Path(details["runsc_root"]), net.netns_path, sandbox_id)["pid"])

    async def checkpoint(self, handle: SandboxHandle, image_dir: Path) -> None:
        """Save the sandbox into ``image_dir`` (runsc's checkpoint.img) and stop it; its files stay.
        CheckpointRefused (the sandbox runs on) while it holds connections gVisor cannot save."""
        await self._in_thread(self._checkpoint_sync, handle, image_dir)

    async def restore(self, handle: SandboxHandle, image_dir: Path) -> None:
        """Run a checkpointed sandbox again from ``image_dir``, in place (same netns, cgroups, files)."""
        await self._in_thread(self._restore_sync, handle, image_dir)
        await self._wait_ready(handle)
        handle.state = "running"

    def _checkpoint_sync(self, handle: SandboxHandle, image_dir: Path) -> None:
        cg = self._cgroups(handle)
        net = SandboxNet.for_slot(int(handle.details["slot"]), handle.sandbox_id)
        if cg.frozen():
            cg.freeze(False)
            time.sleep(0.05)  # the sentry's timers that fell due while frozen (TIME_WAIT ends) run
        root = Path(handle.details["runsc_root"])
        # conntrack's entries older than the sandbox's netstack (its start, or its last restore: a
        # saved netstack held no connection on the veth) are not its connections
        since = float(handle.details.get(RESTORED_AT, handle.details.get("created_at", 0)))
        # Gated from before the quiesce until runsc has returned: nothing can connect meanwhile.
        with quiesce.gated(net):
            unsavable = self._shell(handle, net, savable.EPOLL_TCP_SCAN)
            if unsavable:
                raise CheckpointRefused(
                    f"sandbox {handle.sandbox_id} runs processes whose TCP sockets this gVisor cannot save "
                    f"(they wait on them with epoll): {'; '.join(unsavable[:3])}"
                )
            busy = quiesce.quiet(net, since, lambda: self._shell(handle, net, quiesce.CONNECTED_SCAN), QUIET_WAIT_S)
            if busy:
                raise CheckpointRefused(
                    f"sandbox {handle.sandbox_id} keeps {len(busy)} TCP connection(s) open that gVisor cannot save "
                    f"in a checkpoint ({', '.join(busy[:3])}); close them and try again"
                )
            handle.details[SAVED] = True
            try:
                runsc.checkpoint(root, net.netns_path, handle.sandbox_id, image_dir)
            except BackendError as exc:
                handle.details.pop(SAVED, None)
                if self._sentry_alive(handle):
                    raise CheckpointRefused(f"gVisor could not save sandbox {handle.sandbox_id}: {exc}") from exc
                log.error(
                    "a failed save ended the sandbox",
                    extra={
                        "sandbox_id": handle.sandbox_id,
                        "conntrack": quiesce.describe(net.address),
                        "error": str(exc),
                    },
                )
                raise CheckpointLost(
                    f"gVisor failed to save sandbox {handle.sandbox_id} and the sandbox ended with it: {exc}"
                ) from exc
            except BaseException:
                handle.details.pop(SAVED, None)
                raise
        shutil.copyfile(Path(handle.details["bundle"]).parent / BOOT_ID, image_dir / BOOT_ID)
        handle.details.pop("child_pid", None)
        self._stop_processes(handle.sandbox_id, handle.details, cg)
        runsc.delete(root, net.netns_path, handle.sandbox_id)
        handle.state = "paused"

    def _shell(self, handle: SandboxHandle, net: SandboxNet, script: str) -> list[str]:
        """The non-blank lines ``script`` prints inside the sandbox, stripped."""
        root = Path(handle.details["runsc_root"])
        output = runsc.shell(root, net.netns_path, handle.sandbox_id, script)
        return [line.strip() for line in output.split("\n") if line.strip()]

    def _sentry_alive(self, handle: SandboxHandle) -> bool:
        """After a failed save: is the sentry still there a moment later (a sentry that refused the
        save exits on its own, not at once)?"""
        pid = handle.details.get("child_pid")
        deadline = time.monotonic() + SURVIVED_S
        while pid is not None and self._cgroups(handle).contains(int(pid)):
            if time.monotonic() >= deadline:
                return True
            time.sleep(0.1)
        return False

    def _restore_sync(self, handle: SandboxHandle, image_dir: Path) -> None:
        cg = self._cgroups(handle)
        net = SandboxNet.for_slot(int(handle.details["slot"]), handle.sandbox_id)
        network.readdress(net)
        handle.details[RESTORED_AT] = time.time()
        self._run_runsc(handle.sandbox_id, handle.details, cg, net, image_dir)
        handle.details.pop(SAVED, None)

    async def open_intercept(self, handle: SandboxHandle) -> socket.socket:
        # ns redirects in the sandbox netns's own OUTPUT hook, which netstack's frames pass by: the
        # redirect is on the host's end of the veth here (redirect.py).
        net = SandboxNet.for_slot(int(handle.details["slot"]), handle.sandbox_id)
        listener = await self._in_thread(redirect.open_redirect, net)
        handle.details[REDIRECT_PORT] = listener.getsockname()[1]
        return listener

    async def close_intercept(self, handle: SandboxHandle) -> None:
        net = SandboxNet.for_slot(int(handle.details["slot"]), handle.sandbox_id)
        await self._in_thread(redirect.close_redirect, net, handle.details.pop(REDIRECT_PORT, None))

    def destroy_sync(self, handle: SandboxHandle) -> None:
        if REDIRECT_PORT in handle.details:  # the next sandbox on this veth must not be redirected
            net = SandboxNet.for_slot(int(handle.details["slot"]), handle.sandbox_id)
            redirect.close_redirect(net, handle.details.pop(REDIRECT_PORT))
        super().destroy_sync(handle)

    async def export_filesystem(self, handle: SandboxHandle, dest: Path) -> None:
        """As ns's, but the upper's owners are the sandbox's own ids already: gVisor's gofer (host
        root) writes them unshifted."""
        upper = Path(handle.details["runtime_dir"]) / "rw" / "u"
        await self._in_thread(fsexport.export_upper, upper, dest, 0, UID_RANGE)

    async def is_alive(self, handle: SandboxHandle) -> bool:
        # The sentry is the sandbox: when it is gone (out of memory, killed), what is left of its
        # gofer and stubs serves nobody.
        if handle.details.get(SAVED):  # checkpointed, its restore to come (a snapshot or fork)
            return True
        pid = handle.details.get("child_pid")
        return pid is not None and self._cgroups(handle).contains(int(pid))

    def _stop_processes(self, sandbox_id: str, details: dict[str, Any], cg: SandboxCgroups) -> None:
        # The sentry, gofer and stubs all live in the sandbox's cgroups: one cgroup.kill ends them.
        # runsc's state (its root, in the sandbox dir) goes with the dir; nothing else is left.
        if cg.frozen():
            cg.freeze(False)
        pids = cg.pids_in()
        if not cg.kill():
            raise BackendError(f"processes still in {cg.unified} after cgroup.kill")
        # Until they are reaped, runsc's processes are zombies that still name the sandbox's
        # cgroups: done means gone. Their subreaper (reaper.py) reaps them at once; without one
        # (no compiler) the host's init does, ~1.5 s late on this machine.
        deadline = time.monotonic() + REAP_WAIT_S
        while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.005)
        self._forget_connections(sandbox_id, details)

    def _forget_connections(self, sandbox_id: str, details: dict[str, Any]) -> None:
        """Delete the host's conntrack entries of the sandbox's address, both ways, once its netstack
        is gone. A killed sentry closes nothing, so what the host had opened to it stays tracked in a
        closing state (CLOSE_WAIT of the host's ready probes: 60 s); the next sandbox on this slot
        has the same address, and its checkpoint's quiesce took them for its own connections and
        waited them out (a pause of ~56 s). Only while the slot is still this sandbox's."""
        slot = details.get("slot")
        if slot is None or (self.slots.owner(int(slot)) or {}).get("sandbox_id") != sandbox_id:
            return
        net = SandboxNet.for_slot(int(slot), sandbox_id)
        netlink.delete_conntrack_from(net.address)  # what it started
        netlink.delete_conntrack_from(net.host_address)  # what the host started to it (only that /30's end)
