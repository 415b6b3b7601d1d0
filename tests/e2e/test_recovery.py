"""What a crash leaves in an outbox is published by the next orchestrator: at start-up, and by the sweep."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from orchestrator_kafka import (
    InMemoryEventBus,
    InMemoryStateStore,
    Orchestrator,
    SagaContext,
    WorkflowBuilder,
    WorkflowState,
)
from orchestrator_kafka.errors import StateStoreError, ValidationError, WorkflowExecutionError
from orchestrator_kafka.models import StartBody, StartSaga
from orchestrator_kafka.pipeline import Outcome
from orchestrator_kafka.ports import Timer

from ..conftest import require_redis


def start(tx: str) -> StartSaga:
    return StartSaga(
        event_id=f"start-{tx}",
        transaction_id=tx,
        workflow_id="wf",
        occurred_at=datetime.now(UTC),
        body=StartBody(),
    )


async def test_an_outbox_left_by_a_crash_is_published_at_start_up_and_by_the_sweep() -> None:
    workflow = WorkflowBuilder("wf").add_step("a", "wa").build()
    store, broker = InMemoryStateStore(), InMemoryEventBus()
    crashed = Orchestrator(workflow, broker, store)
    await broker.start()
    # The write lands, the publish never happens: the crash DESIGN section 6 is about.
    assert (await _decide_only(crashed, start("tx-1"))).transition is not None
    assert [p.transaction_id for p in await store.pending_outboxes()] == ["tx-1"]

    restarted = Orchestrator(workflow, InMemoryEventBus.sharing(broker), store, outbox_sweep_interval=0.1)
    async with restarted:
        commands = broker.messages(restarted.topics.commands("wa"))
        assert [m.key for m in commands] == [b"tx-1"]  # published at start-up
        await asyncio.sleep(0.2)
        assert await store.pending_outboxes() == []  # and acknowledged
        # A later leftover is picked up by the periodic sweep once it has stood still for a sweep.
        await _decide_only(restarted, start("tx-2"))
        for _ in range(50):
            if len(broker.messages(restarted.topics.commands("wa"))) == 2:
                break
            await asyncio.sleep(0.05)
    assert sorted(m.key or b"" for m in broker.messages(restarted.topics.commands("wa"))) == [
        b"tx-1",
        b"tx-2",
    ]


async def _decide_only(orchestrator: Orchestrator, event: StartSaga) -> Outcome:
    """Apply the event's transition to the store without publishing it."""
    store = orchestrator.state_store
    outcome = Outcome()
    write = orchestrator.pipeline.decide(event, {}, datetime.now(UTC), outcome)
    assert write is not None
    [result] = await store.apply([write])
    assert result.status == "applied"
    return outcome


class _SwallowsCancel(InMemoryStateStore):
    """A store whose timer claim turns a cancel into a store error, as redis-py can when a cancel lands
    in a read under Python 3.11's asyncio.timeout."""

    def __init__(self) -> None:
        super().__init__()
        self.claims = 0

    async def claim_due_timers(self, now: float, limit: int, lease: float) -> list[Timer]:
        self.claims += 1
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            assert current is not None
            current.uncancel()
            raise StateStoreError("read timed out") from None
        return []


async def test_stop_ends_the_timer_loop_even_when_a_backend_swallows_the_cancel() -> None:
    store = _SwallowsCancel()
    orchestrator = Orchestrator(WorkflowBuilder("wf").add_step("a", "wa").build(), InMemoryEventBus(), store)
    await orchestrator.start()
    while store.claims == 0:
        await asyncio.sleep(0.01)
    await asyncio.wait_for(orchestrator.stop(), timeout=5)
    assert store.claims == 1


@pytest.mark.redis
async def test_stop_closes_the_store_the_orchestrator_made(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default RedisStateStore is the orchestrator's own: stop closes it, and a stopped orchestrator
    refuses to start again on a closed store; a store passed in is left open to its owner."""
    monkeypatch.setenv("REDIS_URL", require_redis())
    workflow = WorkflowBuilder("wf").add_step("a", "wa").build()
    orchestrator = Orchestrator(workflow, InMemoryEventBus())
    async with orchestrator:
        tx = await orchestrator.execute_workflow("wf", {})
        assert (await orchestrator.get_status(tx))["state"] == "running"
    with pytest.raises(StateStoreError, match="closed"):
        await orchestrator.state_store.load_context(tx)
    with pytest.raises(WorkflowExecutionError, match="new Orchestrator"):
        await orchestrator.start()

    store = InMemoryStateStore()
    async with Orchestrator(workflow, InMemoryEventBus(), store) as passed_in:
        tx = await passed_in.execute_workflow("wf", {})
    assert await store.load_context(tx) is not None


async def test_the_sweep_trims_the_indexes_of_sagas_past_their_retention() -> None:
    """The housekeeping loop calls trim on the orchestrator's clock; an ended saga then leaves every
    listing, and its id may start a new saga."""
    trims: list[float] = []
    now = [1_000_000.0]

    class Store(InMemoryStateStore):
        async def trim(self, at: float) -> int:
            trims.append(at)
            return await super().trim(at)

    workflow = WorkflowBuilder("wf").add_step("a", "wa").build()
    store = Store(retention=60, clock=lambda: now[0])
    bus = InMemoryEventBus()
    orchestrator = Orchestrator(workflow, bus, store, outbox_sweep_interval=0.05)
    async with orchestrator:
        await orchestrator.execute_workflow("wf", {}, transaction_id="tx-1")
        assert await store.list_contexts() == ["tx-1"]
        # Ended, as an operator's repair would end it.
        await store.save_context(SagaContext("tx-1", "wf", WorkflowState.COMPLETED, version=9))
        for _ in range(50):
            if trims:
                break
            await asyncio.sleep(0.05)
        assert trims and abs(trims[-1] - datetime.now(UTC).timestamp()) < 60
        assert await store.list_contexts() == ["tx-1"]  # kept for its retention
        now[0] += 61
        calls = len(trims)
        for _ in range(50):
            if len(trims) > calls:
                break
            await asyncio.sleep(0.05)
        assert await store.list_contexts() == []
        assert await store.load_context("tx-1") is None


async def test_an_orchestrator_refuses_topics_whose_partition_count_differs_from_the_recorded_one() -> None:
    workflow = WorkflowBuilder("wf").add_step("a", "wa").build()
    store = InMemoryStateStore()
    async with Orchestrator(workflow, InMemoryEventBus(partitions=4), store):
        pass  # records 4
    bus = InMemoryEventBus(partitions=2)
    with pytest.raises(ValidationError, match="recorded 4 partitions at first start, but the topics have 2"):
        await Orchestrator(workflow, bus, store).start()
    await bus.stop()
