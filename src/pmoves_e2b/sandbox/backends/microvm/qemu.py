"""QEMU's ``microvm`` machine: the command line of one guest, its QMP socket, and the accelerator probe.

KVM is used when ``/dev/kvm`` boots a stock guest kernel (probed once: a guest that prints a marker
and powers off); otherwise TCG, QEMU's software CPU (slow: for tests and hosts without usable KVM,
e.g. the PVM hosts of reference/isolation-on-this-machine.md, where a stock kernel cannot boot).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pmoves_e2b.sandbox.backends.base import BackendError
from pmoves_e2b.sandbox.backends.microvm import guest

QEMU = "qemu-system-x86_64"
# The TCG translation cache (default 1 GiB on 64-bit hosts) counts against the sandbox's memory.
TCG_CACHE_MB = 64
# What QEMU itself uses beside the guest's RAM (translation cache, device and I/O buffers).
QEMU_OVERHEAD_MB = TCG_CACHE_MB + 96
# QEMU's own seccomp filter: no new processes, privileges or resource changes from a compromised QEMU.
SANDBOX_OPTION = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


def tsc_khz() -> int:
    """The host's TSC frequency for ``tsc_early_khz=``: TCG guests that calibrate it may hang."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            return int(float(line.split(":")[1]) * 1000)
    return 0


@dataclass(frozen=True)
class Machine:
    """One guest: what its QEMU command line is made of."""

    kernel: Path
    initrd: Path
    layers: tuple[Path, ...]  # erofs images, topmost first
    disk: Path  # the writable ext4 disk (raw or qcow2)
    disk_format: str
    memory_mb: int
    cpus: int
    accel: str  # "kvm" | "tcg"
    qmp: Path
    console: Path
    tap: str
    incoming: bool = False  # wait for a saved VM state (QMP migrate-incoming) instead of booting
    # Guest RAM in a file: written through (shared) by a VM that is saved, mapped copy-on-write
    # (private) by the VMs restored from it, so a restore loads no RAM and its VMs share the clean pages.
    ram: Path | None = None
    ram_shared: bool = False

    def to_record(self) -> dict[str, Any]:
        """JSON-able (kept in the handle, so a restarted service can resume a VM paused to disk)."""
        return {
            f.name: [str(p) for p in value]
            if isinstance(value, tuple)
            else str(value)
            if isinstance(value, Path)
            else value
            for f in dataclasses.fields(self)
            for value in [getattr(self, f.name)]
        }

    @classmethod
    def from_record(cls, record: dict[str, Any], **changes: Any) -> Machine:
        paths = {"kernel", "initrd", "disk", "qmp", "console"}
        values: dict[str, Any] = {key: Path(value) if key in paths else value for key, value in record.items()}
        values["layers"] = tuple(Path(layer) for layer in record["layers"])
        if record.get("ram") is not None:
            values["ram"] = Path(record["ram"])
        return dataclasses.replace(cls(**values), **changes)

    def argv(self) -> list[str]:
        cmdline = "console=ttyS0 panic=-1 quiet rdinit=/init i8042.noaux i8042.nomux i8042.nopnp"
        if self.accel == "tcg":
            cmdline += f" tsc_early_khz={tsc_khz()}"
            accel = ["-accel", f"tcg,tb-size={TCG_CACHE_MB}", "-cpu", "max"]
        else:
            accel = ["-accel", "kvm", "-cpu", "host"]
        argv = [
            QEMU, "-M", "microvm,x-option-roms=off,rtc=on", *accel,
            "-m", f"{self.memory_mb}M", "-smp", str(self.cpus),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-sandbox", SANDBOX_OPTION,
            "-rtc", "base=utc,clock=host",
            "-kernel", str(self.kernel), "-initrd", str(self.initrd), "-append", cmdline,
        ]  # fmt: skip
        for index, layer in enumerate(self.layers):
            argv += [
                "-drive", f"id=l{index},file={layer},format=raw,if=none,readonly=on,cache=unsafe",
                "-device", f"virtio-blk-device,drive=l{index}",
            ]  # fmt: skip
        argv += [
            "-drive", f"id=rw,file={self.disk},format={self.disk_format},if=none,discard=unmap",
            "-device", "virtio-blk-device,drive=rw",
            "-netdev", f"tap,id=n0,ifname={self.tap},script=no,downscript=no",
            "-device", f"virtio-net-device,netdev=n0,mac={guest.GUEST_MAC}",
            "-serial", f"file:{self.console}",
            "-qmp", f"unix:{self.qmp},server=on,wait=off",
        ]  # fmt: skip
        if self.ram is not None:
            share = "on" if self.ram_shared else "off"
            argv[2] += ",memory-backend=ram"
            argv += ["-object", f"memory-backend-file,id=ram,size={self.memory_mb}M,mem-path={self.ram},share={share}"]
        if self.incoming:
            argv += ["-incoming", "defer"]
        return argv


class Qmp:
    """A QMP connection (JSON lines over the guest's unix socket); events are skipped."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self._sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self._sock.close()
                if time.monotonic() > deadline:
                    raise BackendError(f"QEMU's QMP socket {path} did not open within {timeout:.0f}s") from None
                time.sleep(0.01)
        self._sock.settimeout(timeout)
        self._file = self._sock.makefile("rwb")
        self._read()  # greeting
        self.command("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise BackendError("QEMU closed its QMP socket")
        message: dict[str, Any] = json.loads(line)
        return message

    def command(self, name: str, timeout: float | None = None, **arguments: Any) -> Any:
        if timeout is not None:
            self._sock.settimeout(timeout)
        self._file.write(json.dumps({"execute": name, "arguments": arguments}).encode() + b"\n")
        self._file.flush()
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise BackendError(f"QMP {name}: {reply['error'].get('desc', reply['error'])}")

    def send_fd(self, name: str, fd: int) -> None:
        """Hand QEMU an open file (QMP ``getfd``), e.g. a migration stream: QEMU runs with
        ``-sandbox spawn=deny`` and cannot start ``exec:`` helpers."""
        request = json.dumps({"execute": "getfd", "arguments": {"fdname": name}}).encode() + b"\n"
        socket.send_fds(self._sock, [request], [fd])
        while True:
            reply = self._read()
            if "return" in reply:
                return
            if "error" in reply:
                raise BackendError(f"QMP getfd: {reply['error'].get('desc', reply['error'])}")

    def wait_status(self, wanted: tuple[str, ...], timeout: float) -> str:
        """Until the VM's run state is one of ``wanted``; that state."""
        deadline = time.monotonic() + timeout
        while True:
            status = str(self.command("query-status").get("status"))
            if status in wanted:
                return status
            if status in ("internal-error", "guest-panicked", "shutdown"):
                raise BackendError(f"the VM is {status}, not {wanted}")
            if time.monotonic() > deadline:
                raise BackendError(f"the VM did not reach {wanted} within {timeout:.0f}s (it is {status})")
            time.sleep(0.005)

    def wait_migration(self, timeout: float) -> None:
        """Until an outgoing or incoming migration has completed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.command("query-migrate").get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise BackendError(f"QEMU migration {status}")
            time.sleep(0.01)
        raise BackendError(f"QEMU migration did not complete within {timeout:.0f}s")

    def close(self) -> None:
        try:
            self._file.close()
            self._sock.close()
        except OSError:
            pass


def qemu_available() -> str | None:
    """None when QEMU and the cloud kernel are installed, else what to install."""
    from pmoves_e2b.sandbox.backends.microvm import image

    if not any(os.access(Path(d) / QEMU, os.X_OK) for d in os.environ.get("PATH", "").split(os.pathsep)):
        return "qemu-system-x86_64 not on PATH (apt-get install -y qemu-system-x86 linux-image-cloud-amd64 erofs-utils busybox)"
    for tool, package in ((image.BUSYBOX, "busybox"), (Path("/usr/bin/mkfs.erofs"), "erofs-utils")):
        if not tool.exists():  # the guest's initramfs; the layers' disks
            return f"{tool} is missing (apt-get install -y {package})"
    try:
        image.find_kernel()
    except BackendError as exc:
        return str(exc)
    return None


def kvm_boots(kernel: Path, initrd: Path, timeout: float = 20.0) -> bool:
    """True when ``/dev/kvm`` boots ``kernel`` to its initramfs (which prints a marker and reboots).
    On PVM hosts QEMU aborts at once ("failed to set MSR") or the guest hangs: both are False."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    argv = [
        QEMU, "-M", "microvm,x-option-roms=off", "-accel", "kvm", "-cpu", "host", "-m", "128",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio",
        "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", "console=ttyS0 panic=-1 quiet rdinit=/probe",
    ]  # fmt: skip
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return guest.PROBE_MARKER.encode() in proc.stdout
