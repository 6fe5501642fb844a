"""The warm pool: booted sandboxes per template, waiting to be claimed by a create.

Pooled sandboxes are booted without ``/init`` (the claim configures them) and with internet
access (a claim cuts it when asked). They belong to no one: stopping the service destroys them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pmoves_e2b.sandbox import metrics
from pmoves_e2b.sandbox.aio import wait_event
from pmoves_e2b.sandbox.backends.base import SandboxHandle, SandboxSpec, TemplateImage
from pmoves_e2b.sandbox.errors import SandboxError

log = logging.getLogger(__name__)

REFILL_EVERY_S = 30.0  # also refilled at once after each claim
RETRY_AFTER_S = 5.0  # after a boot failed


@dataclass
class Pooled:
    handle: SandboxHandle
    spec: SandboxSpec


class WarmPool:
    def __init__(
        self,
        size: int,
        templates: tuple[str, ...],
        load_template: Callable[[str], TemplateImage],
        new_spec: Callable[[TemplateImage], SandboxSpec],
        boot: Callable[[SandboxSpec], Awaitable[SandboxHandle]],
        discard: Callable[[SandboxHandle], None],
    ) -> None:
        self.size = size
        self.templates = templates
        self._load_template = load_template
        self._new_spec = new_spec
        self._boot = boot  # raises SandboxError when a boot fails
        self._discard = discard  # destroys a sandbox in the background
        self._ready: dict[str, list[Pooled]] = {}
        self._wakeup = asyncio.Event()

    @property
    def enabled(self) -> bool:
        return self.size > 0 and bool(self.templates)

    def claim(self, template: TemplateImage) -> Pooled | None:
        """A warm sandbox of exactly this build of the template (older builds are discarded)."""
        items = self._ready.get(template.name, [])
        while items:
            pooled = items.pop(0)
            metrics.POOL_READY.labels(template=template.name).set(len(items))
            if pooled.spec.template == template:
                return pooled
            self._discard(pooled.handle)  # booted from layers since rebuilt
        return None

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
            await self.fill()
            self._wakeup.clear()
            await wait_event(self._wakeup, REFILL_EVERY_S)

    async def fill(self) -> None:
        """Boot sandboxes until every pooled template has ``size`` ready (a failure waits, then moves on)."""
        for name in self.templates:
            try:
                template = self._load_template(name)
            except KeyError:
                continue  # not built: nothing to pool
            items = self._ready.setdefault(name, [])
            while len(items) < self.size:
                spec = self._new_spec(template)
                try:
                    handle = await self._boot(spec)
                except SandboxError as exc:
                    log.warning("warm pool could not start a sandbox", extra={"template": name, "error": str(exc)})
                    await asyncio.sleep(RETRY_AFTER_S)
                    break
                items.append(Pooled(handle, spec))
                metrics.POOL_READY.labels(template=name).set(len(items))
            metrics.POOL_READY.labels(template=name).set(len(items))
