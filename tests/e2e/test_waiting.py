"""Waiting for a saga's outcome: Orchestrator.wait_for and SagaClient.wait_for, on each backend."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from orchestrator_kafka import EventBusError, NonRetryableError, SagaClient, StepContext, WorkflowBuilder
from orchestrator_kafka.errors import WorkflowExecutionError
from orchestrator_kafka.ports import IEventBus, Watch, WatchHandler

from ..conftest import Backend
from .harness import Harness, ok


def one_step() -> WorkflowBuilder:
    return WorkflowBuilder("wait").add_step("a", "w_a", "w_undo")


class CountingBus:
    """Counts the watches made on a bus (every waiter should share one)."""

    def __init__(self, bus: IEventBus) -> None:
        self.watches = 0
        original = bus.watch

        async def watch(topic: str, handler: WatchHandler) -> Watch:
            self.watches += 1
            return await original(topic, handler)

        bus.watch = watch  # type: ignore[method-assign]


async def test_a_thousand_waiters_share_one_watch_and_each_gets_its_final_status(backend: Backend) -> None:
    release = asyncio.Event()

    async def a(ctx: StepContext) -> dict[str, Any]:
        await release.wait()  # every saga is still running when its waiter comes
        if ctx.data["n"] % 10 == 0:
            raise NonRetryableError("no")
        return {"n": ctx.data["n"]}

    handlers = {"w_a": a, "w_undo": ok({})}
    async with Harness(backend, [one_step().build()], handlers, worker_options={"concurrency": 200}) as h:
        counted = CountingBus(h.orchestrator.event_bus)
        ids = [await h.orchestrator.execute_workflow("wait", {"n": n}) for n in range(1000)]
        waiters = asyncio.gather(*(h.orchestrator.wait_for(tx, timeout=120) for tx in ids))
        while h.orchestrator._waiters.waiting < 1000:
            await asyncio.sleep(0.05)
        assert not waiters.done()
        release.set()
        statuses = await asyncio.wait_for(waiters, 150)
        assert counted.watches == 1
        # A saga that ended before the call is answered by the read after registering.
        again = await h.orchestrator.wait_for(ids[0], timeout=5)
    assert [s["transaction_id"] for s in statuses] == ids
    for n, status in enumerate(statuses):
        expected = "compensated" if n % 10 == 0 else "completed"
        assert status["state"] == expected, (n, status)
    assert again["state"] == "compensated"


async def test_wait_for_times_out_and_names_unknown_sagas(backend: Backend) -> None:
    release = asyncio.Event()

    async def slow(ctx: StepContext) -> None:
        await release.wait()

    handlers = {"w_a": slow, "w_undo": ok({})}
    async with Harness(backend, [one_step().build()], handlers, worker_options={"grace": 0.1}) as h:
        tx = await h.orchestrator.execute_workflow("wait", {})
        with pytest.raises(TimeoutError):
            await h.orchestrator.wait_for(tx, timeout=0.5)
        with pytest.raises(ValueError, match="unknown transaction id"):
            await h.orchestrator.wait_for("no-such-saga", timeout=1)
        waiting = asyncio.ensure_future(h.orchestrator.wait_for(tx))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        release.set()
        status = await asyncio.wait_for(waiting, 20)
    assert status["state"] == "completed"


async def test_a_client_waits_for_a_saga_it_asked_for(backend: Backend) -> None:
    handlers = {"w_a": ok({"x": 1}), "w_undo": ok({})}
    async with Harness(backend, [one_step().build()], handlers):
        bus = backend.bus()
        await bus.start()
        client = SagaClient(bus, backend.store)
        ids = [await client.start_saga("wait", {}) for _ in range(20)]
        # Asked right away: most are not recorded yet, and are waited for all the same.
        statuses = await asyncio.gather(*(client.wait_for(tx, timeout=30) for tx in ids))
        await client.close()
    assert {s["state"] for s in statuses} == {"completed"}
    assert [s["transaction_id"] for s in statuses] == ids


async def test_a_waiter_fails_at_once_when_the_bus_or_the_orchestrator_stops(backend: Backend) -> None:
    handlers = {"w_undo": ok({})}  # w_a never answers
    async with Harness(backend, [one_step().build()], handlers) as h:
        tx = await h.orchestrator.execute_workflow("wait", {})
        bus = backend.bus()
        await bus.start()
        client = SagaClient(bus, backend.store)
        by_client = asyncio.ensure_future(client.wait_for(tx))
        by_orchestrator = asyncio.ensure_future(h.orchestrator.wait_for(tx))
        await asyncio.sleep(0.3)
        assert not by_client.done() and not by_orchestrator.done()
        await bus.stop()
        with pytest.raises(EventBusError, match="ended"):
            await asyncio.wait_for(by_client, 10)
        await h.orchestrator.stop()
        with pytest.raises(WorkflowExecutionError, match="orchestrator stopped"):
            await asyncio.wait_for(by_orchestrator, 10)
