"""What every tier whose sandboxes live in a per-sandbox netns shares: ``NetnsBackend``.

The ns, gvisor and microvm tiers give each sandbox a slot (``slots.py``: host uid range and /30),
a netns with its veth and nftables rules (``network.py``) and cgroups with its limits
(``cgroups.py``), recorded in ``<runtime_dir>/<id>/state.json``; they differ in what runs in them
(bwrap, runsc, QEMU). This class is the shared part: create (start, then wait until envd listens),
network options, CPU sampling, liveness, teardown and orphan cleanup. A subclass supplies:

- ``_ensure_host_setup()``: its host-wide setup, once (``_setup_lock``, ``_host_ready``);
- ``_start(spec)``: validate (``_check_spec``), allocate (``_new_sandbox``), launch; the handle;
- ``_stop_processes(sandbox_id, details, cg)``: end what runs (teardown's first step);
- ``stats_sync(handle)`` (``_cpu_used_pct`` helps);
- when it has them: ``_unmount(sandbox_dir)`` (teardown) and ``_failure_logs(sandbox_dir)`` (the
  log tails a failed start reports).
"""

from __future__ import annotations

import abc
import asyncio
import errno
import functools
import hashlib
import ipaddress
import json
import logging
import os
import re
import select
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pmoves_e2b.sandbox.aio import poll_until
from pmoves_e2b.sandbox.backends.base import ENVD_PORT, BackendError, SandboxHandle, SandboxSpec, SandboxStats
from pmoves_e2b.sandbox.backends.ns import cgroups, network
from pmoves_e2b.sandbox.backends.ns.cgroups import SandboxCgroups
from pmoves_e2b.sandbox.backends.ns.network import SandboxNet
from pmoves_e2b.sandbox.backends.ns.slots import SlotRegistry

T = TypeVar("T")
log = logging.getLogger(__name__)
SANDBOX_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def log_tail(path: Path, what: str, limit: int = 2000) -> str:
    """The end of a log for an error message ("" when there is none)."""
    try:
        with open(path, "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - limit))
            text = log.read().decode(errors="replace").strip()
    except OSError:
        return ""
    return f"\n--- {what} (tail) ---\n{text}" if text else ""


def _envd_answers(address: str) -> bool | None:
    """One connect to envd, without the event loop: the sandbox's veth hands the SYN to its netns
    and the answer back within the connect call, so its outcome is known right after it (True:
    accepted, False: refused or unreachable) unless the machine deferred those packets (None). A
    tenth of an asyncio connection's CPU; create polls this every few ms until envd listens."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC) as sock:
        err = sock.connect_ex((address, ENVD_PORT))
        if err == errno.EINPROGRESS:
            poller = select.poll()
            poller.register(sock, select.POLLOUT)
            if not poller.poll(0):
                return None
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        return err == 0


class NetnsBackend(abc.ABC):
    name: str
    # envd is polled this often (first, most; seconds) while the sandbox starts
    ready_poll_s: ClassVar[tuple[float, float]] = (0.001, 0.003)
    # what a create says when the launcher (our child) ended before envd listened
    launcher_ended: ClassVar[str] = "envd exited before listening"
    # whether a destroyed sandbox's netns, cleaned (``network.recycle``), serves the next sandbox:
    # only where nothing but the sandbox's own processes used it (not runsc's netstack, not a VM's tap)
    reuse_netns: bool = False
    # at most this many kept per backend (a burst's worth); the rest are destroyed
    free_netns_max: ClassVar[int] = 64

    def __init__(
        self, runtime_dir: Path, *, pids_max: int, ready_timeout: float, slots: SlotRegistry | None, workers: int
    ) -> None:
        self.runtime_dir = Path(runtime_dir).resolve()
        self.pids_max = pids_max
        self.ready_timeout = ready_timeout
        self.slots = slots or SlotRegistry()
        # names the host-wide things of this runtime dir, so several backends (the service, tests)
        # never touch each other's sandboxes
        self.runtime_tag = hashlib.sha256(str(self.runtime_dir).encode()).hexdigest()[:10]
        self.cgroup_parent_name = f"pmoves-e2b-{self.runtime_tag}"
        self.cgroup_parents = cgroups.parent_dirs(self.cgroup_parent_name)
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._cpu_samples: dict[str, tuple[float, int]] = {}
        self._setup_lock = threading.Lock()
        # An own pool: the default one has only cpu+4 threads, and creates must not queue behind
        # slow destroys (netns teardown ~30 ms each).
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"{self.name}-backend")
        self._host_ready = False
        # slots whose netns (veth, addresses, routes) is kept, clean, for the next sandbox
        self._free_slots: list[int] = []
        self._free_lock = threading.Lock()

    # --- what a tier supplies ----------------------------------------------------------------

    @abc.abstractmethod
    def _ensure_host_setup(self) -> None: ...

    @abc.abstractmethod
    def _start(self, spec: SandboxSpec) -> SandboxHandle:
        """Everything up to envd's start; a failure is torn down (``_fail``) before it raises."""

    @abc.abstractmethod
    def _stop_processes(self, sandbox_id: str, details: dict[str, Any], cg: SandboxCgroups) -> None: ...

    @abc.abstractmethod
    def stats_sync(self, handle: SandboxHandle) -> SandboxStats: ...

    def _unmount(self, sandbox_dir: Path) -> None:
        """Teardown's step between the cgroups and the network (a tier without mounts has none)."""
        return None

    def _failure_logs(self, sandbox_dir: Path) -> str:
        """Tails of the logs that say why a sandbox did not start."""
        return ""

    def _ready_hint(self, handle: SandboxHandle) -> str:
        """Appended to "envd did not listen within ...": what the wait depended on."""
        return ""

    # --- the Backend interface ---------------------------------------------------------------

    async def create(self, spec: SandboxSpec) -> SandboxHandle:
        handle = await self._in_thread(self._start, spec)
        try:
            await self._wait_ready(handle)
        except BaseException as exc:
            await asyncio.shield(self._in_thread(self._fail, handle.sandbox_id, handle.details, exc))
            raise
        return handle

    async def destroy(self, handle: SandboxHandle) -> None:
        await self._in_thread(self.destroy_sync, handle)

    async def stats(self, handle: SandboxHandle) -> SandboxStats:
        return await self._in_thread(self.stats_sync, handle)

    async def set_internet(self, handle: SandboxHandle, allowed: bool) -> None:
        net = SandboxNet.for_slot(int(handle.details["slot"]), handle.sandbox_id)
        await self._in_thread(network.set_internet, net, allowed)
        handle.details["allow_internet"] = allowed

    async def set_egress(self, handle: SandboxHandle, allow: tuple[str, ...], deny: tuple[str, ...]) -> None:
        net = SandboxNet.for_slot(int(handle.details["slot"]), handle.sandbox_id)
        await self._in_thread(network.set_egress, net, allow, deny)

    def never_reachable(self) -> list[ipaddress.IPv4Network]:
        return network.never_reachable()

    async def is_alive(self, handle: SandboxHandle) -> bool:
        return self._cgroups(handle).populated()

    async def cleanup_orphans(self, known_ids: set[str]) -> list[str]:
        return await self._in_thread(self.cleanup_orphans_sync, known_ids)

    async def _in_thread(self, func: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(func, *args))

    # --- create ------------------------------------------------------------------------------

    @staticmethod
    def _check_spec(spec: SandboxSpec) -> None:
        if not SANDBOX_ID.match(spec.sandbox_id):
            raise BackendError(f"invalid sandbox id {spec.sandbox_id!r}: use 1-63 of [A-Za-z0-9_-]")
        if not spec.template.layers:
            raise BackendError(f"template {spec.template.name!r} has no layers")
        for layer in spec.template.layers:
            if not Path(layer).is_dir():
                raise BackendError(f"template {spec.template.name!r}: layer {layer} is not a directory")

    def _new_sandbox_dir(self, sandbox_id: str, mode: int) -> tuple[Path, dict[str, Any]]:
        """The sandbox's own dir (an existing one is a BackendError) and its first details."""
        sandbox_dir = self.runtime_dir / sandbox_id
        try:
            sandbox_dir.mkdir(mode=mode)
        except FileExistsError:
            raise BackendError(f"sandbox {sandbox_id} already exists") from None
        return sandbox_dir, {"runtime_dir": str(sandbox_dir), "created_at": time.time()}

    def _new_sandbox(self, spec: SandboxSpec, details: dict[str, Any]) -> tuple[SandboxNet, SandboxCgroups]:
        """A slot, and the names of its netns and cgroups (made by the caller, unless
        ``details["net_reused"]``: the slot's kept netns is then the caller's to ``network.take_free_netns``)."""
        slot = self._take_free_slot(spec.sandbox_id)
        details["net_reused"] = slot is not None
        if slot is None:
            slot = self.slots.allocate(spec.sandbox_id, self.runtime_dir)
        net = SandboxNet.for_slot(slot, spec.sandbox_id)
        cg = SandboxCgroups.under(self.cgroup_parents, spec.sandbox_id)
        details.update(
            slot=slot,
            netns=net.netns,
            host_veth=net.host_veth,
            host_address=net.host_address,
            cgroups=cg.to_dict(),
            allow_internet=spec.allow_internet,
            memory_mb=spec.memory_mb,
            cpu_count=spec.cpu_count,
            disk_mb=spec.disk_mb,
        )
        return net, cg

    def _take_free_slot(self, sandbox_id: str) -> int | None:
        with self._free_lock:
            if not self._free_slots:
                return None
            slot = self._free_slots.pop()
        self.slots.set_owner(slot, {"sandbox_id": sandbox_id, "runtime_dir": str(self.runtime_dir)})
        return slot

    def _keep_network(self, net: SandboxNet) -> bool:
        """Keep a torn-down sandbox's netns for the next one when there is room and it can be
        cleaned (``network.recycle``); False: the caller destroys it."""
        with self._free_lock:
            if not self.reuse_netns or len(self._free_slots) >= self.free_netns_max:
                return False
        try:
            # owner first: a crash after it leaves a free-marked slot whose netns cleanup removes
            self.slots.set_owner(net.slot, {"sandbox_id": "", "runtime_dir": str(self.runtime_dir), "free": True})
            why = network.recycle(net)
        except (OSError, network.NetworkError) as exc:
            why = str(exc)
        if why:
            log.info("netns of slot %s not kept: %s", net.slot, why)
            return False
        with self._free_lock:
            self._free_slots.append(net.slot)
        return True

    def free_slots(self) -> set[int]:
        """Slots whose netns is kept for the next sandbox."""
        with self._free_lock:
            return set(self._free_slots)

    def drain_free_slots(self) -> None:
        """Destroy the kept netns (shutdown, tests): nothing of this backend stays on the host."""
        with self._free_lock:
            slots, self._free_slots = self._free_slots, []
        for slot in slots:
            network.destroy_free(slot)
            self.slots.release(slot)

    def _fail(self, sandbox_id: str, details: dict[str, Any], exc: BaseException) -> None:
        """Tear down a sandbox that did not start, then raise a BackendError with its logs' tails."""
        logs = self._failure_logs(Path(details.get("runtime_dir") or self.runtime_dir / sandbox_id))
        cleanup = ""
        try:
            self._teardown(sandbox_id, details, keep_network=False)  # a failed start: nothing kept
        except BackendError as teardown_error:
            cleanup = f"\n(and the cleanup after it failed: {teardown_error})"
        if isinstance(exc, Exception):
            message = str(exc) if isinstance(exc, BackendError) else f"sandbox {sandbox_id} failed to start: {exc}"
            raise BackendError(f"{message}{cleanup}{logs}") from exc

    async def _wait_ready(self, handle: SandboxHandle) -> None:
        """Until envd accepts TCP on the sandbox address; a BackendError once our launcher has
        exited or the time is up."""

        async def envd_listening() -> bool:
            proc = self._children.get(handle.sandbox_id)
            if proc is not None and proc.poll() is not None:
                raise BackendError(f"sandbox {handle.sandbox_id}: {self.launcher_ended} (rc {proc.returncode})")
            answer = _envd_answers(handle.address)
            if answer is not None:
                return answer
            try:  # the answer was not there at once (a busy machine deferred the packets): wait for it
                _, writer = await asyncio.open_connection(handle.address, ENVD_PORT)
            except OSError:
                return False
            writer.close()
            return True

        first, most = self.ready_poll_s
        if not await poll_until(
            envd_listening, self.ready_timeout, first_delay_s=first, max_delay_s=most, attempt_s=1.0
        ):
            raise BackendError(
                f"sandbox {handle.sandbox_id}: envd did not listen on {handle.address}:{ENVD_PORT} "
                f"within {self.ready_timeout:.0f}s{self._ready_hint(handle)}"
            )

    # --- destroy / cleanup -------------------------------------------------------------------

    def destroy_sync(self, handle: SandboxHandle) -> None:
        self._teardown(handle.sandbox_id, handle.details)

    def _teardown(self, sandbox_id: str, details: dict[str, Any], keep_network: bool = True) -> None:
        """Remove every trace; each step tolerates parts that are already gone (idempotent).

        A failed step does not stop the others; the sandbox dir (with state.json) and the slot
        are then kept so that a later destroy or cleanup_orphans can finish the job."""
        sandbox_dir = Path(details.get("runtime_dir") or self.runtime_dir / sandbox_id)
        if "cgroups" in details:
            cg = SandboxCgroups.from_dict(details["cgroups"])
        else:
            cg = SandboxCgroups.under(self.cgroup_parents, sandbox_id)
        slot = details.get("slot")
        if slot is not None and (self.slots.owner(slot) or {}).get("sandbox_id") != sandbox_id:
            slot = None  # released (a repeated teardown): its veth may be another sandbox's by now
        errors: list[str] = []

        def step(what: str, func: Callable[..., Any], *args: Any) -> None:
            try:
                func(*args)
            except Exception as exc:  # noqa: BLE001 - collected and reported below
                errors.append(f"{what}: {exc}")

        step("stop processes", self._stop_processes, sandbox_id, details, cg)
        step("remove cgroups", cg.remove)
        step("unmount", self._unmount, sandbox_dir)
        kept = False
        if slot is not None:
            net = SandboxNet.for_slot(slot, sandbox_id)
            # only when every process is gone (no step failed): nothing of it may live on in the netns
            kept = keep_network and not errors and self._keep_network(net)
            if not kept:
                step("remove network", network.destroy, net)
        else:
            step("remove network", network.destroy_netns, network.NETNS_PREFIX + sandbox_id)
        self._cpu_samples.pop(sandbox_id, None)
        if errors:
            raise BackendError(
                f"sandbox {sandbox_id} was not fully removed ({'; '.join(errors)}); "
                f"{sandbox_dir} is kept so that destroy or cleanup_orphans can retry"
            )
        if sandbox_dir.exists():
            shutil.rmtree(sandbox_dir)
        if slot is not None and not kept:
            self.slots.release(slot)

    def cleanup_orphans_sync(self, known_ids: set[str]) -> list[str]:
        """Tear down what belongs to this runtime dir but to no known sandbox."""
        self._ensure_host_setup()
        self._drop_unowned_internet_elements()
        removed = self._release_slots_of_vanished_runtime_dirs()
        candidates: set[str] = set()
        if self.runtime_dir.exists():
            candidates.update(entry.name for entry in os.scandir(self.runtime_dir) if entry.is_dir())
        removed += self._remove_unused_free_netns()
        my_slots: dict[str, int] = {}
        for slot, owner in self.slots.owners().items():
            if owner.get("runtime_dir") == str(self.runtime_dir) and not owner.get("free"):
                my_slots[owner["sandbox_id"]] = slot
        candidates.update(my_slots)
        groups = cgroups.children(cgroups.existing_parent_dirs(self.cgroup_parent_name))
        for sandbox_id in sorted(candidates - known_ids):
            details = self._load_details(sandbox_id)
            if "slot" not in details and sandbox_id in my_slots:
                details["slot"] = my_slots[sandbox_id]
            self._teardown(sandbox_id, details, keep_network=False)  # what a crash left is not reused
            removed.append(sandbox_id)
        # groups whose sandbox dir is gone (or lived in another memory cgroup than ours)
        for sandbox_id, paths in sorted(groups.items()):
            if sandbox_id not in known_ids and any(path.exists() for path in paths):
                cgroups.kill_and_remove(paths)
                if sandbox_id not in removed:
                    removed.append(sandbox_id)
        return removed

    def _remove_unused_free_netns(self) -> list[str]:
        """Kept netns this backend does not hold (a crashed predecessor's, or of a free-marked slot
        whose netns is gone) and those no slot owner keeps; their slots are released."""
        removed = []
        with self._free_lock:
            held = set(self._free_slots)
        owners = self.slots.owners()
        for slot, owner in owners.items():
            if owner.get("free") and owner.get("runtime_dir") == str(self.runtime_dir) and slot not in held:
                network.destroy_free(slot)
                self.slots.release(slot)
                removed.append(network.free_netns(slot))
        names = network.list_netns()
        # the owner is written before a netns gets its free name, so read the owners after the listing
        owned = self.slots.owners()
        for name in names:
            kept = network.free_slot_of(name)
            if kept is not None and kept not in owned:
                network.destroy_netns(name)  # no owner: its slot was released, nobody keeps it
                removed.append(name)
        return removed

    def _drop_unowned_internet_elements(self) -> None:
        """Internet permission of an address whose slot nobody holds. Elements are listed before
        the owners: an element is added only after its slot is taken and removed before release."""
        addresses = network.internet_addresses()
        egress = network.egress_addresses()
        owned = set(self.slots.owners())
        for address in addresses | egress:
            slot = network.slot_of_address(address)
            if slot is not None and slot not in owned:
                network.forget(SandboxNet.for_slot(slot, "unowned"))

    def _release_slots_of_vanished_runtime_dirs(self) -> list[str]:
        """Slots (and their netns) left by a backend whose runtime dir is gone (e.g. a deleted
        test data dir): nothing of such a sandbox can still run, as its root lived there."""
        released = []
        for slot, owner in self.slots.owners().items():
            runtime_dir, sandbox_id = owner.get("runtime_dir"), owner.get("sandbox_id", "")
            if not runtime_dir or Path(runtime_dir).exists():
                continue
            if owner.get("free"):
                network.destroy_free(slot)
                sandbox_id = network.free_netns(slot)
            elif SANDBOX_ID.match(sandbox_id):
                network.destroy(SandboxNet.for_slot(slot, sandbox_id))
            else:
                continue
            self.slots.release(slot)
            released.append(sandbox_id)
        return released

    def _load_details(self, sandbox_id: str) -> dict[str, Any]:
        try:
            details: dict[str, Any] = json.loads((self.runtime_dir / sandbox_id / "state.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return details

    # --- stats -------------------------------------------------------------------------------

    def _cpu_used_pct(self, handle: SandboxHandle, cg: SandboxCgroups) -> float:
        """CPU % (of the sandbox's CPUs) since the previous call, or since creation on the first one."""
        cpu_count = float(handle.details.get("cpu_count", 1))
        now, usage = time.time(), cg.cpu_usage_usec()
        last_time, last_usage = self._cpu_samples.get(
            handle.sandbox_id, (float(handle.details.get("created_at", now)), 0)
        )
        self._cpu_samples[handle.sandbox_id] = (now, usage)
        elapsed = max(now - last_time, 1e-3)
        return round(min(100.0, max(0.0, (usage - last_usage) / 1e6 / elapsed / cpu_count * 100)), 2)

    def _cgroups(self, handle: SandboxHandle) -> SandboxCgroups:
        try:
            return SandboxCgroups.from_dict(handle.details["cgroups"])
        except KeyError:
            raise BackendError(
                f"handle of sandbox {handle.sandbox_id} has no cgroups (not from the {self.name} backend?)"
            ) from None
