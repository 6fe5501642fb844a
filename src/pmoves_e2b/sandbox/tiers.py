"""Isolation tiers: which backend runs a sandbox, chosen per service, template and create.

A tier is a name, a probe (``None`` when this host can run it, else why not) and a factory for its
backend. The choice for one create, strongest say first: the create's metadata key
``e2b.isolation`` (``METADATA_KEY``), the template's ``isolation`` setting, ``E2B_ISOLATION``.
A tier that is unknown, unavailable here or not allowed by ``E2B_ISOLATION_TIERS`` is a 400 that
names the tiers this host supports and why the others are not. Probes run once, when the service
starts (installing ``runsc`` takes a restart to be seen).

A new tier registers itself here: one ``Tier`` in ``TIERS`` (its backend is imported only when
its factory or ``kind`` runs, so a host without it pays nothing). What a tier can do (snapshots:
``Tiers.has``) is read from its backend's class, so no backend is made to word an error.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pmoves_e2b.config import Settings
from pmoves_e2b.sandbox.backends.base import Backend, BackendError, SandboxHandle, SandboxSpec, SandboxStats
from pmoves_e2b.sandbox.errors import BadRequest

if TYPE_CHECKING:
    from pmoves_e2b.sandbox.backends.gvisor import GvisorBackend
    from pmoves_e2b.sandbox.backends.microvm import MicrovmBackend
    from pmoves_e2b.sandbox.backends.ns import NsBackend

METADATA_KEY = "e2b.isolation"


@dataclass(frozen=True)
class Tier:
    name: str
    summary: str
    probe: Callable[[], str | None]  # None: usable on this host; else the reason it is not
    factory: Callable[[Settings], Backend]
    kind: Callable[[], type[Backend]]  # its backend's class (imported on call): what it can do, without making one


def _ns_probe() -> str | None:
    if os.geteuid() != 0:
        return "needs root (namespaces, cgroups, nftables)"
    missing = [tool for tool in ("bwrap", "ip", "nft") if shutil.which(tool) is None]
    return f"not on PATH: {', '.join(missing)} (apt-get install bubblewrap iproute2 nftables)" if missing else None


def _ns_kind() -> type[NsBackend]:
    from pmoves_e2b.sandbox.backends.ns import NsBackend

    return NsBackend


def _ns_factory(settings: Settings) -> Backend:
    return _ns_kind()(
        runtime_dir=settings.e2b_data_dir / "sandboxes",
        zygote=settings.e2b_envd_zygote,
        netns_reuse=settings.e2b_netns_reuse,
    )


def _microvm_probe() -> str | None:
    if os.geteuid() != 0:
        return "needs root (namespaces, cgroups, nftables, tap devices)"
    from pmoves_e2b.sandbox.backends.microvm.qemu import qemu_available

    return qemu_available()


def _microvm_kind() -> type[MicrovmBackend]:
    from pmoves_e2b.sandbox.backends.microvm import MicrovmBackend

    return MicrovmBackend


def _microvm_factory(settings: Settings) -> Backend:
    return _microvm_kind()(
        runtime_dir=settings.e2b_data_dir / "microvm-sandboxes",
        cache_dir=settings.e2b_microvm_cache_dir or settings.e2b_data_dir / "microvm",
        accel=settings.e2b_microvm_accel,
        snapshots=settings.e2b_microvm_snapshots,
        warm=settings.e2b_microvm_warm,
    )


def _gvisor_probe() -> str | None:
    from pmoves_e2b.sandbox.backends.gvisor import runsc

    return _ns_probe() or runsc.probe()


def _gvisor_kind() -> type[GvisorBackend]:
    from pmoves_e2b.sandbox.backends.gvisor import GvisorBackend

    return GvisorBackend


def _gvisor_factory(settings: Settings) -> Backend:
    return _gvisor_kind()(runtime_dir=settings.e2b_data_dir / "sandboxes-gvisor")


TIERS: dict[str, Tier] = {
    tier.name: tier
    for tier in (
        Tier("ns", "namespaces + seccomp + cgroups (bubblewrap), shared host kernel", _ns_probe, _ns_factory, _ns_kind),
        Tier(
            "microvm",
            "QEMU microvm guest, own kernel (KVM, else TCG: slow)",
            _microvm_probe,
            _microvm_factory,
            _microvm_kind,
        ),
        Tier(
            "gvisor",
            "gVisor user-space kernel (runsc, ptrace platform) + the ns netns and cgroups",
            _gvisor_probe,
            _gvisor_factory,
            _gvisor_kind,
        ),
    )
}


@dataclass(frozen=True)
class TierStatus:
    name: str
    summary: str
    reason: str | None  # None: available

    @property
    def available(self) -> bool:
        return self.reason is None


def probe(names: str = "") -> list[TierStatus]:
    """Every registered tier and whether this host can run it; ``names`` (E2B_ISOLATION_TIERS,
    comma-separated, empty = all) are the ones the operator allows."""
    allowed = set(_names(names))
    statuses = []
    for tier in TIERS.values():
        if allowed and tier.name not in allowed:
            reason: str | None = "not in E2B_ISOLATION_TIERS"
        else:
            try:
                reason = tier.probe()
            except Exception as exc:  # noqa: BLE001 - a broken probe means the tier is not usable
                reason = f"probe failed: {exc}"
        statuses.append(TierStatus(tier.name, tier.summary, reason))
    return statuses


class Tiers:
    """The tiers one service may use: resolves each create's choice and holds their backends
    (made on first use). ``Tiers.single(backend)`` is one tier, e.g. a test's fake backend."""

    def __init__(
        self,
        default: str,
        statuses: list[TierStatus],
        factories: dict[str, Callable[[], Backend]],
        kinds: dict[str, Callable[[], type[Backend]]] | None = None,
    ) -> None:
        self.default = default
        self.statuses = {s.name: s for s in statuses}
        self._factories = factories
        self._kinds = kinds or {}
        self._backends: dict[str, Backend] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> Tiers:
        wrong = {settings.e2b_isolation} | set(_names(settings.e2b_isolation_tiers))
        if wrong - set(TIERS):
            raise ValueError(
                f"E2B_ISOLATION / E2B_ISOLATION_TIERS name unknown tiers: {', '.join(sorted(wrong - set(TIERS)))}; "
                f"known: {', '.join(TIERS)}"
            )
        factories = {name: _bind(tier.factory, settings) for name, tier in TIERS.items()}
        kinds = {name: tier.kind for name, tier in TIERS.items()}
        return cls(settings.e2b_isolation, probe(settings.e2b_isolation_tiers), factories, kinds)

    @classmethod
    def single(cls, backend: Backend) -> Tiers:
        tiers = cls(backend.name, [TierStatus(backend.name, backend.name, None)], {})
        tiers._backends[backend.name] = backend
        return tiers

    def default_for(self, template_tier: str) -> str:
        return template_tier or self.default

    def choose(self, requested: str | None, template_name: str, template_tier: str) -> str:
        """The tier of one create; ``BadRequest`` when it cannot run here."""
        name = requested if requested is not None else self.default_for(template_tier)
        source = (
            f"metadata '{METADATA_KEY}'"
            if requested is not None
            else f"template '{template_name}'"
            if template_tier
            else "E2B_ISOLATION"
        )
        status = self.statuses.get(name)
        if status is None:
            raise BadRequest(f"unknown isolation tier '{name}' ({source}). {self.describe()}")
        if status.reason is not None:
            raise BadRequest(
                f"isolation tier '{name}' ({source}) is not available on this host: {status.reason}. {self.describe()}"
            )
        return name

    def describe(self) -> str:
        available = [s.name for s in self.statuses.values() if s.available]
        text = f"Tiers available here: {', '.join(available) or 'none'}"
        others = [f"{s.name} ({s.reason})" for s in self.statuses.values() if not s.available]
        if others:
            text += f"; unavailable: {'; '.join(others)}"
        return text + f". Choose one per sandbox with metadata '{METADATA_KEY}'."

    def report(self) -> dict[str, Any]:
        """What /health says about isolation."""
        return {
            "default": self.default,
            "tiers": {
                s.name: {"available": True} if s.available else {"available": False, "reason": s.reason}
                for s in self.statuses.values()
            },
        }

    def backend(self, name: str) -> Backend:
        backend = self._backends.get(name)
        if backend is None:
            factory = self._factories.get(name)
            if factory is None:
                raise BackendError(f"isolation tier '{name}' is not known to this service")
            backend = self._backends[name] = factory()
        return backend

    def has(self, name: str, *methods: str) -> bool:
        """Whether tier ``name``'s backend has ``methods`` (e.g. snapshots' ``export_filesystem``),
        read from its class: no backend is made for the answer (availability is ``statuses``')."""
        backend: object = self._backends.get(name)
        if backend is None:
            kind = self._kinds.get(name)
            if kind is None:
                return False
            backend = kind()
        return all(callable(getattr(backend, method, None)) for method in methods)

    def made(self) -> list[Backend]:
        """The backends made so far (re-adoption makes those of the stored handles first)."""
        return list(self._backends.values())

    def usable(self) -> list[Backend]:
        """Backends of every available tier (cleanup at start and shutdown looks at all of them)."""
        for status in self.statuses.values():
            if status.available:
                self.backend(status.name)
        return self.made()


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _bind(factory: Callable[[Settings], Backend], settings: Settings) -> Callable[[], Backend]:
    return lambda: factory(settings)


class TieredBackend:
    """The ``Backend`` the control plane sees: a create goes to its spec's tier, everything else
    to the tier that made the handle (``handle.backend``)."""

    name = "tiers"

    def __init__(self, tiers: Tiers) -> None:
        self.tiers = tiers

    def _of(self, handle: SandboxHandle) -> Backend:
        return self.tiers.backend(handle.backend)

    async def create(self, spec: SandboxSpec) -> SandboxHandle:
        name = spec.isolation or self.tiers.default
        status = self.tiers.statuses.get(name)
        if status is None or status.reason is not None:
            raise BackendError(f"isolation tier '{name}' is not available: {status.reason if status else 'unknown'}")
        return await self.tiers.backend(name).create(spec)

    async def pause(self, handle: SandboxHandle) -> None:
        await self._of(handle).pause(handle)

    async def resume(self, handle: SandboxHandle) -> None:
        await self._of(handle).resume(handle)

    async def destroy(self, handle: SandboxHandle) -> None:
        await self._of(handle).destroy(handle)

    async def set_internet(self, handle: SandboxHandle, allowed: bool) -> None:
        await self._of(handle).set_internet(handle, allowed)

    async def set_egress(self, handle: SandboxHandle, allow: tuple[str, ...], deny: tuple[str, ...]) -> None:
        await self._of(handle).set_egress(handle, allow, deny)

    async def open_intercept(self, handle: SandboxHandle) -> socket.socket:
        return await self._of(handle).open_intercept(handle)

    async def close_intercept(self, handle: SandboxHandle) -> None:
        await self._of(handle).close_intercept(handle)

    def never_reachable(self) -> list[ipaddress.IPv4Network]:
        backends = self.tiers.made() or [self.tiers.backend(self.tiers.default)]
        return sorted({net for backend in backends for net in backend.never_reachable()})

    async def stats(self, handle: SandboxHandle) -> SandboxStats:
        return await self._of(handle).stats(handle)

    async def is_alive(self, handle: SandboxHandle) -> bool:
        return await self._of(handle).is_alive(handle)

    async def cleanup_orphans(self, known_ids: set[str]) -> list[str]:
        removed: list[str] = []
        for backend in self.tiers.usable():
            removed += await backend.cleanup_orphans(known_ids)
        return removed

    def close(self) -> None:
        for backend in self.tiers.made():
            backend.close()
