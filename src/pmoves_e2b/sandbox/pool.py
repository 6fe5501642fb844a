"""The warm pool: booted sandboxes per template, waiting to be claimed by a create.

Pooled sandboxes are booted without ``/init`` (the claim configures them) and with internet
access (a claim cuts it when asked). They belong to no one: they are not in the store, so no
list shows them and no user's limit counts them; stopping the service destroys them.

The pool follows demand: a template's target is the number of sandboxes created from it in the
last ``DEMAND_WINDOW_S`` (a burst of twenty leaves twenty warm for the next one), never below
``E2B_POOL_SIZE`` for the pooled templates (the floor) nor above ``E2B_POOL_MAX`` (the ceiling);
``E2B_POOL_SIZE=0`` turns the pool off.
Growth above the floor must also fit what the manager says there is room for (free slots under
``E2B_MAX_SANDBOXES`` and the memory budget); after an idle window the pool shrinks to the floor.
Refills boot several sandboxes at once; ``boot`` takes the boot gate's refill slots, which let
user creates go first (sandbox/admission.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pmoves_e2b.sandbox import metrics
from pmoves_e2b.sandbox.aio import wait_event
from pmoves_e2b.sandbox.backends.base import SandboxHandle, SandboxSpec, TemplateImage
from pmoves_e2b.sandbox.errors import SandboxError

log = logging.getLogger(__name__)

REFILL_EVERY_S = 30.0  # also refilled at once after each create
RETRY_AFTER_S = 5.0  # after a boot failed
DEMAND_WINDOW_S = 60.0


@dataclass
class Pooled:
    handle: SandboxHandle
    spec: SandboxSpec


@dataclass(frozen=True)
class PoolSizes:
    floor: int  # kept warm for each pooled template whatever the demand (E2B_POOL_SIZE)
    ceiling: int  # most kept warm for one template (E2B_POOL_MAX)


class WarmPool:
    def __init__(
        self,
        sizes: PoolSizes,
        templates: tuple[str, ...],
        load_template: Callable[[str], TemplateImage],
        new_spec: Callable[[TemplateImage], SandboxSpec],
        boot: Callable[[SandboxSpec], Awaitable[SandboxHandle]],
        discard: Callable[[SandboxHandle], None],
        room: Callable[[TemplateImage], Awaitable[int]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sizes = PoolSizes(sizes.floor, max(sizes.floor, sizes.ceiling))
        self.templates = templates
        self._load_template = load_template
        self._new_spec = new_spec
        self._boot = boot  # raises SandboxError when a boot fails
        self._discard = discard  # destroys a sandbox in the background
        self._room = room  # how many more sandboxes of this template fit beside the live ones
        self._clock = clock
        self._ready: dict[str, list[Pooled]] = {}
        self._booting: dict[str, int] = {}
        self._booting_mb = 0
        self._demand: dict[str, deque[float]] = {}
        self._wakeup = asyncio.Event()

    @property
    def enabled(self) -> bool:
        return self.sizes.floor > 0

    def claim(self, template: TemplateImage) -> Pooled | None:
        """A warm sandbox of exactly this build of the template (older builds are discarded).
        Every call counts as demand for the template, hit or miss."""
        self._demand.setdefault(template.name, deque()).append(self._clock())
        items = self._ready.get(template.name, [])
        while items:
            pooled = items.pop(0)
            self._show(template.name)
            if pooled.spec.template == template:
                metrics.POOL_HITS.labels(template=template.name).inc()
                return pooled
            self._discard(pooled.handle)  # booted from layers since rebuilt
        metrics.POOL_MISSES.labels(template=template.name).inc()
        return None

    def held(self) -> tuple[int, int]:
        """Warm and booting sandboxes, and the memory (MB) they were promised."""
        ready = [p for items in self._ready.values() for p in items]
        count = len(ready) + sum(self._booting.values())
        return count, sum(p.spec.memory_mb for p in ready) + self._booting_mb

    def ready(self, name: str) -> int:
        """Warm sandboxes of this template that a create can claim now."""
        return len(self._ready.get(name, ()))

    def target(self, name: str) -> int:
        recent = self._demand.get(name)
        horizon = self._clock() - DEMAND_WINDOW_S
        while recent and recent[0] < horizon:
            recent.popleft()
        floor = self.sizes.floor if name in self.templates else 0
        return min(self.sizes.ceiling, max(floor, len(recent or ())))

    def wake(self) -> None:
        """Refill now (a sandbox was claimed)."""
        self._wakeup.set()

    def drain(self) -> list[SandboxHandle]:
        """Take every warm sandbox out of the pool (the caller destroys them)."""
        handles = [p.handle for items in self._ready.values() for p in items]
        self._ready.clear()
        return handles

    async def run(self) -> None:
        while True:
            self._wakeup.clear()  # before the fill: a create during it asks for another pass
            await self.fill()
            await wait_event(self._wakeup, REFILL_EVERY_S)

    async def fill(self) -> None:
        """Shrink templates above their target, then boot what is missing, several at once."""
        names = sorted(set(self.templates) | set(self._demand) | set(self._ready))
        boots: list[Awaitable[None]] = []
        for name in names:
            try:
                template: TemplateImage | None = self._load_template(name)
            except KeyError:
                template = None  # not built (or removed): nothing to pool
            target = self.target(name) if template else 0
            self._shrink(name, target, template)
            have = len(self._ready.get(name, ())) + self._booting.get(name, 0)
            if template is None or target <= have:
                continue
            floor = self.sizes.floor if name in self.templates else 0
            to_floor = max(0, floor - have)  # the floor is kept whatever the room
            growth = target - have - to_floor
            if growth > 0:  # demand beyond the floor: only what fits beside the live sandboxes
                growth = min(growth, max(0, await self._room(template) - len(boots)))
            boots.extend(self._boot_one(name, template) for _ in range(to_floor + growth))
        if boots:
            await asyncio.gather(*boots)

    def _shrink(self, name: str, target: int, template: TemplateImage | None) -> None:
        """Let go of warm sandboxes of an older build, then of those beyond the target."""
        items = self._ready.get(name, [])
        for stale in [p for p in items if p.spec.template != template]:
            items.remove(stale)
            self._discard(stale.handle)
        while len(items) > target:
            self._discard(items.pop().handle)
        self._show(name)

    async def _boot_one(self, name: str, template: TemplateImage) -> None:
        spec = self._new_spec(template)
        self._booting[name] = self._booting.get(name, 0) + 1
        self._booting_mb += spec.memory_mb
        handle: SandboxHandle | None = None
        started = self._clock()
        try:
            handle = await self._boot(spec)
        except SandboxError as exc:
            log.warning("warm pool could not start a sandbox", extra={"template": name, "error": str(exc)})
        else:
            metrics.POOL_REFILL_SECONDS.labels(template=name).observe(self._clock() - started)
        finally:
            self._booting[name] -= 1
            self._booting_mb -= spec.memory_mb
        if handle is None:
            await asyncio.sleep(RETRY_AFTER_S)
            return
        self._ready.setdefault(name, []).append(Pooled(handle, spec))
        self._show(name)

    def _show(self, name: str) -> None:
        metrics.POOL_READY.labels(template=name).set(len(self._ready.get(name, ())))
        metrics.POOL_TARGET.labels(template=name).set(self.target(name))
