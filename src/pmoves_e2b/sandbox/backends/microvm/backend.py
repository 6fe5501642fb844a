"""The microVM isolation tier: each sandbox is a QEMU ``microvm`` guest with its own kernel.

    backend = MicrovmBackend(runtime_dir=data_dir / "microvm-sandboxes", cache_dir=data_dir / "microvm")
    handle = await backend.create(spec)      # returns once envd accepts TCP on handle.address:49983
    await backend.destroy(handle)

What one sandbox is:
- the ns tier's slot, netns, veth, nftables rules and cgroups (``ns/network.py``, ``ns/cgroups.py``,
  reused, not copied), so the host reaches it at the same kind of address under the same policy;
  what every netns tier does with them (create's wait for envd, network options, teardown,
  cleanup) is ``NetnsBackend``'s (``ns/netns_backend.py``);
- in that netns a tap device and QEMU (``qemu.py``) joined to the sandbox's cgroups: memory limit =
  guest RAM + QEMU's own overhead, CPU quota = the sandbox's CPUs, pids for QEMU's threads;
- the guest (``guest.py``): Debian's cloud kernel booted directly, the template's layers as
  read-only erofs disks under an overlay whose upper layer is the sandbox's ext4 disk (``image.py``),
  envd started by the guest's pid 1; the guest's fixed address is translated to the sandbox address
  in the netns, so envd is reached exactly as in the ns tier.

Creates restore a snapshot when the backend keeps them (default): a VM of the same template and
shape (memory, CPUs, disk) is booted once, saved once (QMP ``migrate`` to a file) with its disk, and
every create starts a QEMU that loads it (``migrate-incoming``) on a copy-on-write disk over the
saved one; the host then tells the guest the time and hands it fresh entropy (``guest.py``), since
every restored VM starts with the snapshot's clock and random pool. All sandboxes restored from one
snapshot share its envd init secret (envd reads it once, at start): the secret only guards ``/init``,
which the proxy never forwards and no other sandbox can reach.

Warm saved VMs (``warm``, default): a template whose start command serves ``ready_port`` (the code
interpreter) is saved after that command is up and ready, so a create restores a running server
with its kernels started and imports done instead of starting them under the guest's CPU. The
handle then says so (``TEMPLATE_STARTED``) and the control plane does not start it again. After
each restore, once the guest has the host's entropy, the backend calls ``POST /restored`` on that
port: the server reseeds its processes' user-space PRNGs and changes its kernels' message keys
(``interpreter/kernel.py``), which the saved memory holds the same in every copy. What stays the
same in every copy: the processes' PIDs, address-space layout and hash seeds, and the init secret;
envd's access token is set per sandbox by ``/init`` after the restore, and the interpreter checks
tokens against envd, so nothing that authenticates a client is in the image.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import http.client
import json
import math
import os
import re
import secrets
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pmoves_e2b.sandbox.backends.base import (
    ENVD_PORT,
    TEMPLATE_STARTED,
    BackendError,
    SandboxHandle,
    SandboxSpec,
    SandboxStats,
    TemplateImage,
)
from pmoves_e2b.sandbox.backends.microvm import guest, image, qemu
from pmoves_e2b.sandbox.backends.ns import cgroups, network
from pmoves_e2b.sandbox.backends.ns.backend import JOIN_AND_LIMIT
from pmoves_e2b.sandbox.backends.ns.cgroups import SandboxCgroups
from pmoves_e2b.sandbox.backends.ns.netns_backend import NetnsBackend, log_tail, write_json
from pmoves_e2b.sandbox.backends.ns.network import SandboxNet
from pmoves_e2b.sandbox.backends.ns.slots import SlotRegistry
from pmoves_e2b.sandbox.envd_client import EnvdClient

TAP = "tap0"
# Bump when what a saved VM holds changes in a way its key does not see.
SNAPSHOT_VERSION = "3"
ACCELS = ("auto", "kvm", "tcg")
# QEMU's threads (vCPUs, I/O workers); the guest's own processes live in the guest.
QEMU_PIDS_MAX = 256
# How long a VM being saved warm may take to start its template's command and pass its ready checks:
# the code interpreter and its kernels take 1-2 minutes under TCG on a loaded 2-core machine.
WARM_START_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class _Parts:
    """The guest's boot files and layer disks, shared by every VM of a template."""

    kernel: Path
    initrd: Path
    layers: tuple[Path, ...]


@dataclass(frozen=True)
class _Snapshot:
    """A saved VM: its memory and device state, its disk, the initramfs it booted from, envd's secret."""

    directory: Path
    started: bool  # saved with the template's start command up and ready (warm)

    @property
    def state(self) -> Path:
        return self.directory / "vm.state"

    @property
    def disk(self) -> Path:
        return self.directory / "disk.img"

    @property
    def ram(self) -> Path:
        return self.directory / "ram"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd"

    @property
    def secret(self) -> str:
        return (self.directory / "secret").read_text()

    def complete(self) -> bool:
        return (self.directory / "meta.json").exists()


class MicrovmBackend(NetnsBackend):
    name = "microvm"
    ready_poll_s = (0.005, 0.05)
    launcher_ended = "the VM ended before envd listened"

    def __init__(
        self,
        runtime_dir: Path,
        cache_dir: Path,
        *,
        accel: str = "auto",
        pids_max: int = 1024,
        ready_timeout: float = 180.0,
        slots: SlotRegistry | None = None,
        snapshots: bool = True,
        warm: bool = True,
    ) -> None:
        if accel not in ACCELS:
            raise ValueError(f"accel must be one of {', '.join(ACCELS)}, not {accel!r}")
        super().__init__(runtime_dir, pids_max=pids_max, ready_timeout=ready_timeout, slots=slots, workers=16)
        self.cache_dir = Path(cache_dir).resolve()
        self.requested_accel = accel
        self.use_snapshots = snapshots
        self.warm = warm
        self._accel: str | None = None

    # --- host setup -------------------------------------------------------------------------

    def _ensure_host_setup(self) -> None:
        with self._setup_lock:
            if self._host_ready:
                return
            for directory in (self.runtime_dir, self.cache_dir):
                directory.mkdir(parents=True, exist_ok=True)
                directory.chmod(0o700)
            network.ensure_host_setup()
            self._host_ready = True

    @property
    def accel(self) -> str:
        """``kvm`` or ``tcg``: as configured, or for ``auto`` whether KVM boots the guest kernel
        (probed once per kernel and kept in the cache dir)."""
        if self._accel is None:
            if self.requested_accel != "auto":
                self._accel = self.requested_accel
            else:
                kernel, modules = image.find_kernel()
                record = self.cache_dir / f"accel-{kernel.name}.json"
                try:
                    self._accel = str(json.loads(record.read_text())["accel"])
                except (FileNotFoundError, ValueError, KeyError):
                    initrd = image.initramfs(self.cache_dir, modules)
                    self._accel = "kvm" if qemu.kvm_boots(kernel, initrd) else "tcg"
                    write_json(record, {"accel": self._accel})
        return self._accel

    def close(self) -> None:
        """Remove this runtime dir's cgroup parents if no sandbox is left (tests, shutdown)."""
        with self._setup_lock:
            if self.runtime_dir.exists() and any(self.runtime_dir.iterdir()):
                return
            cgroups.remove_parents(cgroups.existing_parent_dirs(self.cgroup_parent_name))
            self._host_ready = False

    # --- the Backend interface (the rest is NetnsBackend's) ------------------------------------

    async def pause(self, handle: SandboxHandle) -> None:
        """Save the VM (memory and devices) to the sandbox's dir and end its QEMU: a paused sandbox
        holds no memory and survives a restart of the service."""
        await self._in_thread(self._pause_to_disk, handle)
        handle.state = "paused"

    async def resume(self, handle: SandboxHandle) -> None:
        await self._in_thread(self._resume_from_disk, handle)
        try:
            await self._wait_ready(handle)
        except BackendError:
            await self._in_thread(self._stop_processes, handle.sandbox_id, handle.details, self._cgroups(handle))
            raise
        handle.state = "running"

    async def open_intercept(self, handle: SandboxHandle) -> socket.socket:
        # The ns tier redirects the sandbox's own outbound connections in its netns; a guest's are
        # forwarded through the netns, which that redirect does not see.
        raise BackendError("domain-based egress rules are not supported by the microvm isolation tier; use CIDRs")

    async def close_intercept(self, handle: SandboxHandle) -> None:
        return None

    async def is_alive(self, handle: SandboxHandle) -> bool:
        if handle.details.get("paused_state"):
            return Path(handle.details["paused_state"]).exists()
        return await super().is_alive(handle)

    # --- create ------------------------------------------------------------------------------

    def _start(self, spec: SandboxSpec) -> SandboxHandle:
        """Validate and build the guest's images; then restore the template's snapshot or boot."""
        self._check_spec(spec)
        if spec.memory_mb < 128 or spec.disk_mb < 64 or spec.cpu_count <= 0:
            raise BackendError("the microvm tier needs memory_mb >= 128, disk_mb >= 64 and cpu_count > 0")
        self._ensure_host_setup()
        kernel, modules = image.find_kernel()
        parts = _Parts(
            kernel=kernel,
            initrd=image.initramfs(self.cache_dir, modules),
            layers=tuple(image.layer_image(self.cache_dir, Path(layer)) for layer in spec.template.layers),
        )
        if not self.use_snapshots:
            return self._start_vm(spec, parts, None)
        return self._start_vm(spec, parts, self._snapshot(spec, parts))

    def _start_vm(
        self, spec: SandboxSpec, parts: _Parts, snapshot: _Snapshot | None, save_to: _Snapshot | None = None
    ) -> SandboxHandle:
        """Allocate, network, cgroups, disk; QEMU boots the guest (with its RAM in ``save_to``'s
        file, when it will be saved), or loads ``snapshot``."""
        sandbox_dir, details = self._new_sandbox_dir(spec.sandbox_id, 0o700)
        try:
            net, cg = self._new_sandbox(spec, details)
            details.update(accel=self.accel, snapshot=snapshot.directory.name if snapshot else None)
            write_json(sandbox_dir / "state.json", details)
            cg.create(spec.memory_mb + qemu.QEMU_OVERHEAD_MB, spec.cpu_count, QEMU_PIDS_MAX)
            network.create_netns(net)
            network.configure(net, spec.allow_internet)
            network.attach_vm_tap(net, TAP, guest.TAP_ADDRESS, guest.GUEST_ADDRESS, guest.PREFIX, guest.TAP_MAC)
            if snapshot is None:
                disk, disk_format = sandbox_dir / "disk.img", "raw"
                image.make_disk(disk, spec.disk_mb)
                initrd = sandbox_dir / "initrd"
                image.sandbox_initramfs(parts.initrd, initrd, self._guest_config(spec, len(parts.layers)))
            else:
                disk, disk_format = sandbox_dir / "disk.qcow2", "qcow2"
                image.overlay_disk(snapshot.disk, disk)
                initrd = snapshot.initrd  # the same bytes the saved guest booted from
            machine = qemu.Machine(
                kernel=parts.kernel,
                initrd=initrd,
                layers=parts.layers,
                disk=disk,
                disk_format=disk_format,
                memory_mb=spec.memory_mb,
                cpus=max(1, math.ceil(spec.cpu_count)),
                accel=self.accel,
                qmp=sandbox_dir / "qmp.sock",
                console=sandbox_dir / "console.log",
                tap=TAP,
                incoming=snapshot is not None,
                ram=snapshot.ram if snapshot else save_to.ram if save_to else None,
                ram_shared=save_to is not None,
            )
            details["machine"] = machine.to_record()
            self._launch(spec.sandbox_id, machine, net, cg, details)
            write_json(sandbox_dir / "state.json", details)
            if snapshot is not None:
                started = spec.template if snapshot.started else None
                details["restore_s"] = self._restore(machine, snapshot.state, net, started)
                details[TEMPLATE_STARTED] = snapshot.started
                write_json(sandbox_dir / "state.json", details)
        except BaseException as exc:
            self._fail(spec.sandbox_id, details, exc)
            raise
        return SandboxHandle(
            sandbox_id=spec.sandbox_id,
            backend=self.name,
            address=net.address,
            init_secret=snapshot.secret if snapshot else spec.init_secret,
            details=details,
        )

    # --- snapshots ---------------------------------------------------------------------------

    def _warm(self, template: TemplateImage) -> bool:
        """Whether its saved VM holds its start command running: a server on ``ready_port`` (ours,
        the code interpreter) can be told of a restore (``POST /restored``) and reseed; others start
        their command in every sandbox, as on the other tiers."""
        return self.warm and bool(template.start_cmd) and bool(template.ready_port)

    def _snapshot(self, spec: SandboxSpec, parts: _Parts) -> _Snapshot:
        """The saved VM for this template and shape, booted and saved on first use."""
        shape = [parts.kernel.name, parts.initrd.name, *(layer.name for layer in parts.layers)]
        shape += [str(spec.memory_mb), str(math.ceil(spec.cpu_count)), str(spec.disk_mb), self.accel]
        shape += [str(self.pids_max), SNAPSHOT_VERSION]
        warm = self._warm(spec.template)
        if warm:  # what runs in it
            template = spec.template
            shape += ["warm", template.start_cmd, template.start_user, str(template.ready_port), template.ready_cmd]
        key = hashlib.sha256("\0".join(shape).encode()).hexdigest()[:16]
        directory = self.cache_dir / "snapshots" / key
        snapshot = _Snapshot(directory, started=warm)
        if snapshot.complete():
            return snapshot
        with image.locked(directory):
            if snapshot.complete():
                return snapshot
            self._save_snapshot(spec, parts, snapshot)
        return snapshot

    def _save_snapshot(self, spec: SandboxSpec, parts: _Parts, snapshot: _Snapshot) -> None:
        secret = secrets.token_urlsafe(24)
        boot = dataclasses.replace(spec, sandbox_id=f"snapshot-{snapshot.directory.name}", init_secret=secret)
        handle = self._start_vm(boot, parts, None, save_to=snapshot)
        sandbox_dir = Path(handle.details["runtime_dir"])
        try:
            asyncio.run(self._ready_to_save(handle, spec.template if snapshot.started else None))
            connection = qemu.Qmp(sandbox_dir / "qmp.sock")
            try:
                connection.command("stop")
                self._save(connection, snapshot.state)  # the RAM is in the snapshot's file already
                connection.command("quit")
            finally:
                connection.close()
            self._children.pop(handle.sandbox_id).wait()
            snapshot.ram.chmod(0o600)  # the guest's memory
            (sandbox_dir / "disk.img").replace(snapshot.disk)
            (sandbox_dir / "initrd").replace(snapshot.initrd)
            fd = os.open(snapshot.directory / "secret", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secret)
            meta = {"template": spec.template.name, "saved_at": time.time(), "started": snapshot.started}
            write_json(snapshot.directory / "meta.json", meta)
        except BaseException as exc:
            self._fail(handle.sandbox_id, handle.details, exc)
            raise
        self._teardown(handle.sandbox_id, handle.details)

    async def _ready_to_save(self, handle: SandboxHandle, started: TemplateImage | None) -> None:
        """Until envd serves (its first request imports what serving needs: the saved VM has done
        that) and, with ``started``, the template's start command is up and its ready checks pass."""
        await self._wait_ready(handle)
        envd = EnvdClient()
        try:
            await envd.wait_http_ok(handle.address, ENVD_PORT, "/health", self.ready_timeout)
            if started is not None:
                await envd.start_template(handle.address, started, WARM_START_TIMEOUT_S)
        finally:
            await envd.close()

    # --- pause to disk ------------------------------------------------------------------------

    def _pause_to_disk(self, handle: SandboxHandle) -> None:
        details = handle.details
        sandbox_dir = Path(details["runtime_dir"])
        state = sandbox_dir / "paused.state"
        connection = qemu.Qmp(sandbox_dir / "qmp.sock")
        try:
            connection.command("stop")
            try:
                self._save(connection, state)
            except BaseException:
                connection.command("cont")  # not saved: the sandbox runs on
                raise
            connection.command("quit")
        finally:
            connection.close()
        cg = self._cgroups(handle)
        proc = self._children.pop(handle.sandbox_id, None)
        if proc is not None:
            proc.wait()
        if not cg.wait_empty(timeout=10):
            raise BackendError(f"sandbox {handle.sandbox_id}: QEMU did not exit after saving the VM")
        details["paused_state"] = str(state)
        write_json(sandbox_dir / "state.json", details)

    def _resume_from_disk(self, handle: SandboxHandle) -> None:
        details = handle.details
        if not details.get("paused_state"):
            raise BackendError(f"sandbox {handle.sandbox_id} is not paused")
        state = Path(details["paused_state"])
        machine = qemu.Machine.from_record(details["machine"], incoming=True)
        net = SandboxNet.for_slot(int(details["slot"]), handle.sandbox_id)
        machine.qmp.unlink(missing_ok=True)
        self._launch(handle.sandbox_id, machine, net, self._cgroups(handle), details)
        try:
            details["resume_s"] = self._restore(machine, state, net)
        except BaseException:
            self._stop_processes(handle.sandbox_id, details, self._cgroups(handle))
            raise
        del details["paused_state"]
        state.unlink()
        write_json(Path(details["runtime_dir"]) / "state.json", details)

    @staticmethod
    def _save(connection: qemu.Qmp, target: Path, timeout: float = 600.0) -> None:
        """The stopped VM's state (devices, and RAM unless it is a shared file) into ``target``."""
        connection.command("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])
        partial = target.with_suffix(".tmp")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            connection.send_fd("migration", fd)
        finally:
            os.close(fd)
        connection.command("migrate", uri="fd:migration")
        connection.wait_migration(timeout=timeout)
        partial.replace(target)

    def _restore(
        self, machine: qemu.Machine, state: Path, net: SandboxNet, started: TemplateImage | None = None
    ) -> dict[str, float]:
        """Load the saved VM into the new QEMU, then give the guest the time and fresh entropy and,
        with ``started`` (saved warm), tell its start command's server; the seconds each step took."""
        begun = time.monotonic()
        steps: dict[str, float] = {}
        connection = qemu.Qmp(machine.qmp)
        steps["qemu_start"] = time.monotonic() - begun
        try:
            fd = os.open(state, os.O_RDONLY | os.O_CLOEXEC)
            try:
                connection.send_fd("state", fd)
            finally:
                os.close(fd)
            connection.command(
                "migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}]
            )
            connection.command("migrate-incoming", uri="fd:state")
            # the VM was saved stopped, so it is loaded paused
            if connection.wait_status(("paused", "running"), timeout=self.ready_timeout) == "paused":
                connection.command("cont")
            steps["load"] = time.monotonic() - begun - steps["qemu_start"]
        finally:
            connection.close()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as control:
            control.settimeout(0.05)
            deadline = time.monotonic() + self.ready_timeout
            while True:
                message = f"restored {time.time_ns()} {secrets.token_hex(64)}".encode()
                control.sendto(message, (net.address, guest.CONTROL_PORT))
                try:
                    reply = control.recv(512)
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise BackendError("the restored guest did not answer the host") from None
                    continue
                if reply != b"ok":
                    raise BackendError(f"the restored guest refused the host's time and entropy: {reply!r}")
                steps["guest_answer"] = time.monotonic() - begun - steps["qemu_start"] - steps["load"]
                break
        if started is not None:
            self._tell_restored(net.address, started.ready_port)
            steps["server_reseeded"] = time.monotonic() - begun - sum(steps.values())
        return {step: round(seconds, 3) for step, seconds in steps.items()}

    def _tell_restored(self, address: str, port: int) -> None:
        """``POST /restored`` to the template's server in a VM restored warm; before ``/init``, so
        envd has no access token yet and the server lets the host's call through."""
        connection = http.client.HTTPConnection(address, port, timeout=self.ready_timeout)
        try:
            connection.request("POST", "/restored", body=b"")
            answer = connection.getresponse()
            body = answer.read(300)
        except OSError as exc:
            raise BackendError(f"the template's server on port {port} did not answer POST /restored: {exc}") from exc
        finally:
            connection.close()
        if answer.status >= 300:
            hint = (
                " (a template built before warm saved VMs: rebuild it with `pmoves-e2b template build`, "
                "or set E2B_MICROVM_WARM=false)"
                if answer.status == 404
                else ""
            )
            raise BackendError(
                f"the template's server on port {port} refused POST /restored: "
                f"{answer.status} {body.decode(errors='replace')}{hint}"
            )

    def _guest_config(self, spec: SandboxSpec, layer_count: int) -> dict[str, str]:
        if not re.fullmatch(r"[A-Za-z0-9_-]*", spec.init_secret):
            raise BackendError("the init secret must be URL-safe base64")
        return {
            "LAYERS": str(layer_count),
            "SECRET": spec.init_secret,
            "PIDS_MAX": str(self.pids_max),
            "SHM_BYTES": str(spec.memory_mb * 1024 * 1024 // 2),
        }

    def _launch(
        self, sandbox_id: str, machine: qemu.Machine, net: SandboxNet, cg: SandboxCgroups, details: dict[str, Any]
    ) -> None:
        """QEMU in the sandbox's netns (its tap is there) and cgroups (joined before exec)."""
        argv = [
            "/usr/bin/nsenter", f"--net={net.netns_path}", "--",
            "/bin/sh", "-c", JOIN_AND_LIMIT, "sh", *map(str, cg.procs_files()),
            *machine.argv(),
        ]  # fmt: skip
        log = Path(details["runtime_dir"]) / "qemu.log"
        log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "NOFILE": "4096", "NPROC": "65536"},
                start_new_session=True,
            )
        finally:
            os.close(log_fd)
        self._children[sandbox_id] = proc
        details["pid"] = proc.pid

    def _failure_logs(self, sandbox_dir: Path) -> str:
        return log_tail(sandbox_dir / "qemu.log", "QEMU") + log_tail(sandbox_dir / "console.log", "guest console")

    def _ready_hint(self, handle: SandboxHandle) -> str:
        return f" ({handle.details.get('accel')})"

    # --- destroy / cleanup -------------------------------------------------------------------

    def _stop_processes(self, sandbox_id: str, details: dict[str, Any], cg: SandboxCgroups) -> None:
        if cg.frozen():
            cg.freeze(False)
        if not cg.kill():
            raise BackendError(f"processes still in {cg.unified} after cgroup.kill")
        proc = self._children.pop(sandbox_id, None)
        if proc is not None:
            proc.wait()

    # --- stats -------------------------------------------------------------------------------

    def stats_sync(self, handle: SandboxHandle) -> SandboxStats:
        """CPU and memory as the host sees the VM (QEMU's cgroup); disk = blocks the guest's disk holds."""
        cg = self._cgroups(handle)
        cpu_pct = self._cpu_used_pct(handle, cg)
        mem_used, _ = cg.memory_usage()
        mem_total = int(handle.details.get("memory_mb", 0)) * 1024 * 1024
        disk_total = int(handle.details.get("disk_mb", 0)) * 1024 * 1024
        disk_used = 0
        for name in ("disk.img", "disk.qcow2"):
            try:
                disk_used += os.stat(Path(handle.details["runtime_dir"]) / name).st_blocks * 512
            except FileNotFoundError:
                continue
        return SandboxStats(
            cpu_count=float(handle.details.get("cpu_count", 1)),
            cpu_used_pct=cpu_pct,
            mem_used_bytes=min(mem_used, mem_total) if mem_total else mem_used,
            mem_total_bytes=mem_total,
            disk_used_bytes=min(disk_used, disk_total),
            disk_total_bytes=disk_total,
        )
