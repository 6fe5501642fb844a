"""Admission of sandbox boots: at most ``slots`` boot at once, creates queue in arrival order.

A boot is mostly CPU (envd's start); fifty at once on two cores makes every one of them slow.
Creates that find every slot busy wait in a bounded FIFO queue; a full queue, or a wait longer
than the bound, is refused at once with ``Busy`` (503 + Retry-After), never left to the client's
timeout. Warm-pool refills use the same slots but always yield to a waiting create.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator

from pmoves_e2b.sandbox import metrics
from pmoves_e2b.sandbox.errors import Busy


class BootGate:
    def __init__(self, slots: int, queue_max: int, max_wait_s: float) -> None:
        self.slots = max(1, slots)
        self.queue_max = queue_max
        self.max_wait_s = max_wait_s
        self._free = self.slots
        self._creates: deque[asyncio.Future[None]] = deque()
        self._refills: deque[asyncio.Future[None]] = deque()

    @property
    def free_slots(self) -> int:
        return self._free

    @property
    def waiting_creates(self) -> int:
        return sum(1 for waiter in self._creates if not waiter.done())

    @contextlib.asynccontextmanager
    async def create(self) -> AsyncIterator[None]:
        """A boot slot for a user's create (``Busy`` when the queue is full or the wait too long)."""
        if self._free == 0 and self.waiting_creates >= self.queue_max:
            metrics.CREATES_REFUSED_BUSY.inc()
            raise Busy(
                f"{self.queue_max} sandbox creates are already waiting for a boot slot (E2B_CREATE_QUEUE); "
                "retry in a moment.",
                retry_after_s=self._retry_after_s(),
            )
        await self._acquire(self._creates, self.max_wait_s)
        try:
            yield
        finally:
            self._release()

    @contextlib.asynccontextmanager
    async def refill(self) -> AsyncIterator[None]:
        """A boot slot for the warm pool: only when no create is waiting."""
        await self._acquire(self._refills, None)
        try:
            yield
        finally:
            self._release()

    def _retry_after_s(self) -> int:
        return max(1, min(30, int(self.max_wait_s)))

    async def _acquire(self, queue: deque[asyncio.Future[None]], wait_s: float | None) -> None:
        if self._free > 0 and not self._creates and (queue is self._creates or not self._refills):
            self._free -= 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append(waiter)
        self._show()
        try:
            done, _ = await asyncio.wait({waiter}, timeout=wait_s)
        except asyncio.CancelledError:
            self._give_up(queue, waiter)
            raise
        if not done:
            self._give_up(queue, waiter)
            metrics.CREATES_REFUSED_BUSY.inc()
            raise Busy(
                f"no boot slot became free within {self.max_wait_s:g} s (E2B_CREATE_QUEUE_WAIT_SEC): "
                "the machine is busy starting other sandboxes; retry in a moment.",
                retry_after_s=self._retry_after_s(),
            )

    def _give_up(self, queue: deque[asyncio.Future[None]], waiter: asyncio.Future[None]) -> None:
        if waiter.done() and not waiter.cancelled():
            self._release()  # the slot was handed over as we gave up: pass it on
        else:
            waiter.cancel()
        with contextlib.suppress(ValueError):
            queue.remove(waiter)
        self._show()

    def _release(self) -> None:
        self._free += 1
        while self._free > 0:
            queue = self._creates if self._creates else self._refills
            if not queue:
                return
            waiter = queue.popleft()
            if waiter.done():
                continue  # gave up already
            self._free -= 1
            waiter.set_result(None)
            self._show()

    def _show(self) -> None:
        metrics.CREATE_QUEUE.set(self.waiting_creates)
