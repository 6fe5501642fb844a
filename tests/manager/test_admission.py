"""The boot gate: creates get boot slots in arrival order, refills only when no create waits, and a
refused create reaches the client as 503 with Retry-After in E2B's error format."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import FastAPI

from pmoves_e2b.sandbox.admission import BootGate
from pmoves_e2b.sandbox.api import install_error_handlers
from pmoves_e2b.sandbox.errors import Busy


async def _take(gate: BootGate, kind: str, name: str, order: list[str], release: asyncio.Event) -> None:
    async with gate.create() if kind == "create" else gate.refill():
        order.append(name)
        await release.wait()


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_creates_get_slots_in_arrival_order_and_refills_wait_for_them() -> None:
    async def scenario() -> list[str]:
        gate = BootGate(1, queue_max=10, max_wait_s=10)
        order: list[str] = []
        release = {name: asyncio.Event() for name in ("first", "refill", "c1", "c2", "c3")}
        tasks = [asyncio.create_task(_take(gate, "create", "first", order, release["first"]))]
        await _settle()
        tasks.append(asyncio.create_task(_take(gate, "refill", "refill", order, release["refill"])))
        await _settle()
        for name in ("c1", "c2", "c3"):
            tasks.append(asyncio.create_task(_take(gate, "create", name, order, release[name])))
            await _settle()
        for name in ("first", "c1", "c2", "c3", "refill"):
            release[name].set()
            await _settle()
        await asyncio.gather(*tasks)
        assert gate.free_slots == 1
        return order

    # The refill asked before c1..c3 but goes last: a user's create never waits behind the pool.
    assert asyncio.run(scenario()) == ["first", "c1", "c2", "c3", "refill"]


def test_a_create_that_gives_up_passes_its_slot_on() -> None:
    async def scenario() -> None:
        gate = BootGate(1, queue_max=10, max_wait_s=10)
        order: list[str] = []
        hold, never, last = asyncio.Event(), asyncio.Event(), asyncio.Event()
        first = asyncio.create_task(_take(gate, "create", "first", order, hold))
        await _settle()
        impatient = asyncio.create_task(_take(gate, "create", "impatient", order, never))
        patient = asyncio.create_task(_take(gate, "create", "patient", order, last))
        await _settle()
        impatient.cancel()  # the client went away while queued
        hold.set()
        last.set()
        await asyncio.gather(first, patient)
        assert order == ["first", "patient"]
        assert gate.free_slots == 1 and gate.waiting_creates == 0

    asyncio.run(scenario())


def test_busy_is_503_with_retry_after_in_e2b_error_format() -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/sandboxes")
    async def create() -> None:
        raise Busy("64 sandbox creates are already waiting (E2B_CREATE_QUEUE); retry in a moment.", retry_after_s=7)

    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
            return await client.post("/sandboxes")

    response = asyncio.run(scenario())
    assert response.status_code == 503
    assert response.headers["retry-after"] == "7"
    assert "should-retry" not in response.headers  # retryable
    assert response.json() == {
        "code": 503,
        "message": "64 sandbox creates are already waiting (E2B_CREATE_QUEUE); retry in a moment.",
    }


@pytest.mark.parametrize("slots", [1, 2])
def test_a_full_queue_is_refused_without_waiting(slots: int) -> None:
    async def scenario() -> None:
        gate = BootGate(slots, queue_max=1, max_wait_s=30)
        hold = asyncio.Event()
        order: list[str] = []
        busy = [asyncio.create_task(_take(gate, "create", f"b{i}", order, hold)) for i in range(slots + 1)]
        await _settle()
        assert gate.waiting_creates == 1
        with pytest.raises(Busy) as refused:
            async with gate.create():
                pass
        assert refused.value.retry_after_s >= 1
        hold.set()
        await asyncio.gather(*busy)

    asyncio.run(scenario())
