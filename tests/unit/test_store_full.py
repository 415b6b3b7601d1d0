"""The orchestrator on a store that refuses writes, in memory (a store made to refuse like a full Redis;
the real thing is tests/e2e/test_redis_full.py): the timer loop backs off, the refused work is done
once the store has room, and the check runs before anything starts."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from orchestrator_kafka import (
    ConfigurationError,
    EventBusError,
    InMemoryEventBus,
    InMemoryStateStore,
    Orchestrator,
    RetryPolicy,
    StepContext,
    Worker,
    WorkflowBuilder,
)
from orchestrator_kafka.errors import StoreFullError
from orchestrator_kafka.values import ApplyResult, Timer, TransitionWrite


class FullStore(InMemoryStateStore):
    """Refuses every write, as a full Redis does, while ``full``; counts the timer claims."""

    def __init__(self) -> None:
        super().__init__()
        self.full = False
        self.claims = 0

    async def apply(self, writes: Sequence[TransitionWrite]) -> list[ApplyResult]:
        if self.full:
            raise StoreFullError("refused: full")
        return await super().apply(writes)

    async def claim_due_timers(self, now: float, limit: int, lease: float) -> list[Timer]:
        self.claims += 1
        if self.full:
            raise StoreFullError("refused: full")
        return await super().claim_due_timers(now, limit, lease)


async def test_the_timer_loop_backs_off_while_the_store_refuses_and_fires_timers_once_it_has_room() -> None:
    workflow = WorkflowBuilder("wf").add_step("a", "wa", retry=RetryPolicy(initial_delay=0.2)).build()
    store, bus = FullStore(), InMemoryEventBus(redelivery_delay=0.01)
    tries: list[int] = []

    def flaky(ctx: StepContext) -> dict[str, int]:
        tries.append(ctx.attempt)
        if ctx.attempt == 1:
            raise RuntimeError("try again")
        return {"attempt": ctx.attempt}

    worker = Worker(InMemoryEventBus.sharing(bus))
    worker.register("wa", flaky)
    async with Orchestrator(workflow, bus, store, timer_interval=0.01) as orchestrator, worker:
        tx = await orchestrator.execute_workflow("wf", {})
        async with asyncio.timeout(5):
            while (saga := await store.load_context(tx)) is None or saga.steps["a"].timer_id is None:
                await asyncio.sleep(0.01)
        store.full = True  # the retry is scheduled; now the store is full
        claims = store.claims
        await asyncio.sleep(1.5)
        # Every 10 ms for 1.5 s would be 150 claims; backing off from 0.1 s, doubling, it is a handful.
        assert store.claims - claims <= 8, store.claims - claims
        assert orchestrator.unready_reason() is not None
        assert tries == [1]
        store.full = False
        async with asyncio.timeout(10):
            while (await orchestrator.get_status(tx))["state"] != "completed":
                await asyncio.sleep(0.02)
        assert tries == [1, 2]  # the retry was not lost
        assert orchestrator.unready_reason() is None


async def test_start_runs_the_store_check_before_anything_else() -> None:
    class Evicting(InMemoryStateStore):
        async def check(self) -> None:
            raise ConfigurationError("evicts")

    bus = InMemoryEventBus()
    orchestrator = Orchestrator(WorkflowBuilder("wf").add_step("a", "wa").build(), bus, Evicting())
    with pytest.raises(ConfigurationError, match="evicts"):
        await orchestrator.start()
    with pytest.raises(EventBusError, match="not started"):
        await bus.publish([])  # the check came first: the bus was not even started
    await InMemoryStateStore().check()  # the memory store has nothing to check
