"""The interface between the control plane and an isolation backend.

The control plane (``sandbox/lifecycle.py``) decides *what* runs and *when*; a backend
decides *how* it is isolated. Handles are plain data so they can be stored in the database
and re-adopted by a restarted e2b-sandbox process.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Any, Protocol

from pmoves_e2b.envd import ENVD_PORT as ENVD_PORT  # re-exported: backends and their tests use it


@dataclass(frozen=True, kw_only=True)
class TemplateRuntime:
    """How a template's sandboxes run: declared by its definition (``templates/model.py``), written
    into its record by the builder and read back for the backend, so the fields exist once."""

    # Command envd should start once initialised, e.g. the code interpreter; may be empty.
    start_cmd: str = ""
    # Port that must answer HTTP GET /health before the sandbox counts as ready (0 = none).
    ready_port: int = 0
    # Bash that must exit 0 (retried) before the sandbox counts as ready ("" = none).
    ready_cmd: str = ""
    user: str = "user"
    start_user: str = ""  # who runs start_cmd; empty: ``user``
    workdir: str = "/home/user"
    # Per-template resources; 0 means the service defaults (E2B_SANDBOX_MEMORY_MB / _CPU_LIMIT).
    memory_mb: int = 0
    cpu_count: float = 0
    # Isolation tier of its sandboxes (sandbox/tiers.py); empty: the service's E2B_ISOLATION.
    isolation: str = ""
    # A memory snapshot (sandbox/snapshots.py): its sandboxes restore this image instead of booting.
    restore_image: str = ""

    def __post_init__(self) -> None:
        if not self.start_user:
            object.__setattr__(self, "start_user", self.user)

    def runtime_record(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(TemplateRuntime)}

    @staticmethod
    def runtime_from_record(record: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments from a record; fields it lacks (older records) keep their defaults."""
        types = {"ready_port": int, "memory_mb": int, "cpu_count": float}
        return {
            f.name: types.get(f.name, str)(record[f.name])
            for f in dataclasses.fields(TemplateRuntime)
            if record.get(f.name) is not None
        }


@dataclass(frozen=True)
class TemplateImage(TemplateRuntime):
    """A built template, as the backend needs it."""

    name: str
    # Read-only rootfs layers, topmost first (overlayfs lowerdir order).
    layers: tuple[str, ...]


@dataclass(frozen=True)
class SandboxSpec:
    sandbox_id: str
    template: TemplateImage
    memory_mb: int
    cpu_count: float
    disk_mb: int
    allow_internet: bool = True
    # Secret envd requires on POST /init (so only the host can configure it).
    init_secret: str = ""
    # The tier chosen for it (sandbox/tiers.py); empty: the service's default.
    isolation: str = ""


# A handle's ``details`` key a backend sets when the sandbox it created runs its template's start
# command already (restored from a VM saved with it running): the control plane does not start it again.
TEMPLATE_STARTED = "template_started"


@dataclass
class SandboxHandle:
    """Everything needed to reach, control and clean up one running sandbox."""

    sandbox_id: str
    backend: str
    address: str  # IP the host reaches envd and other sandbox ports on
    init_secret: str
    state: str = "running"  # running | paused
    # Backend-private details (pids, uid base, netns, cgroup paths, mount points).
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SandboxHandle:
        return cls(**data)


@dataclass(frozen=True)
class SandboxStats:
    cpu_count: float
    cpu_used_pct: float
    mem_used_bytes: int
    mem_total_bytes: int
    disk_used_bytes: int
    disk_total_bytes: int


class BackendError(RuntimeError):
    """A backend operation failed; the message says what to do next."""


class SandboxLost(BackendError):
    """The operation failed and the sandbox ended with it (e.g. a gVisor save this runsc refused)."""


class Backend(Protocol):
    name: str

    async def create(self, spec: SandboxSpec) -> SandboxHandle:
        """Start the sandbox; return once envd accepts connections on ``handle.address``."""

    async def pause(self, handle: SandboxHandle) -> None:
        """Freeze every process of the sandbox (memory is kept)."""

    async def resume(self, handle: SandboxHandle) -> None:
        """Thaw a paused sandbox."""

    async def destroy(self, handle: SandboxHandle) -> None:
        """Kill everything and remove every trace: processes, mounts, netns, cgroups, nft rules, disk."""

    async def set_internet(self, handle: SandboxHandle, allowed: bool) -> None:
        """Allow or block outbound internet (used when a warm sandbox is claimed)."""

    async def set_egress(self, handle: SandboxHandle, allow: tuple[str, ...], deny: tuple[str, ...]) -> None:
        """Replace the sandbox's outbound CIDR rules: ``allow`` wins over ``deny``; the rest follows
        ``set_internet``."""

    async def open_intercept(self, handle: SandboxHandle) -> socket.socket:
        """A listening socket that the sandbox's outbound TCP to ports 80/443 is redirected to."""

    async def close_intercept(self, handle: SandboxHandle) -> None:
        """Stop redirecting the sandbox's web traffic."""

    def never_reachable(self) -> list[ipaddress.IPv4Network]:
        """Destinations no sandbox may reach (the egress proxy checks them too)."""

    async def stats(self, handle: SandboxHandle) -> SandboxStats:
        """Current resource use of the sandbox."""

    async def is_alive(self, handle: SandboxHandle) -> bool:
        """True while the sandbox's processes exist (used to re-adopt after a restart)."""

    async def cleanup_orphans(self, known_ids: set[str]) -> list[str]:
        """Remove remains (mounts, netns, cgroups, rules, dirs) of sandboxes not in ``known_ids``."""

    def close(self) -> None:
        """Undo the backend's host setup once no sandbox is left (``pmoves-e2b down``)."""
