"""The orchestrator's saga cache never lets a stale view win: the store's version check decides."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime

import pytest

from orchestrator_kafka import InMemoryEventBus, InMemoryStateStore, Orchestrator, WorkflowBuilder
from orchestrator_kafka.codec import decode, encode
from orchestrator_kafka.errors import EventBusError, OrchestratorError, StateStoreError
from orchestrator_kafka.models import CancelSaga, ResultBody, StartBody, StartSaga, StepResult, command_id
from orchestrator_kafka.ports import (
    ApplyResult,
    IEventBus,
    InboundMessage,
    IStateStore,
    OutboxMessage,
    TransitionWrite,
)


def result(tx: str, step: str, run: str) -> StepResult:
    return StepResult(
        event_id=str(uuid.uuid4()),
        transaction_id=tx,
        workflow_id="wf",
        occurred_at=datetime.now(UTC),
        body=ResultBody(
            command_id=command_id(tx, step, "execute", 1, run),
            step=step,
            kind="execute",
            attempt=1,
            status="succeeded",
        ),
    )


async def test_two_instances_with_stale_caches_apply_each_transition_once() -> None:
    workflow = WorkflowBuilder("wf").add_step("a", "wa").add_step("b", "wb").add_step("c", "wc").build()
    store = InMemoryStateStore()
    first = Orchestrator(workflow, InMemoryEventBus(), store)
    second = Orchestrator(workflow, InMemoryEventBus(), store)
    for o in (first, second):
        await o.event_bus.start()
    start = StartSaga(
        event_id="s", transaction_id="tx", workflow_id="wf", occurred_at=datetime.now(UTC), body=StartBody()
    )
    await first.process([start])  # first caches version 1
    stored = await store.load_context("tx")
    assert stored is not None
    run = stored.run_id
    [outcome] = await second.process([result("tx", "a", run)])  # second loads version 1, writes version 2
    assert outcome.transition is not None and outcome.transition.changed
    # first's cached version 1 is stale: its write conflicts, it reloads version 2 and decides again.
    [outcome] = await first.process([result("tx", "b", run)])
    assert outcome.transition is not None and outcome.transition.changed
    # second's cache (version 2) is stale too; a duplicate of b's result changes nothing.
    [outcome] = await second.process([result("tx", "b", run)])
    assert outcome.transition is not None and not outcome.transition.changed
    saga = await store.load_context("tx")
    assert saga is not None and saga.version == 3
    assert saga.completed == ["a", "b"] and saga.current_step == "c"


class _BlockingStore(InMemoryStateStore):
    """Holds its next apply until released, then fails it."""

    def __init__(self) -> None:
        super().__init__()
        self.hold: asyncio.Event | None = None
        self.applies = 0

    async def apply(self, writes: Sequence[TransitionWrite]) -> list[ApplyResult]:
        self.applies += 1
        if self.hold is not None:
            hold, self.hold = self.hold, None
            await hold.wait()
            raise StateStoreError("Redis went away")
        return await super().apply(writes)


def _start(tx: str, event_id: str | None = None) -> StartSaga:
    return StartSaga(
        event_id=event_id or tx,
        transaction_id=tx,
        workflow_id="wf",
        occurred_at=datetime.now(UTC),
        body=StartBody(),
    )


def _inbound(topic: str, message: StartSaga | CancelSaga, offset: int) -> InboundMessage:
    return InboundMessage(topic, 0, offset, message.transaction_id.encode(), encode(message))


async def test_a_batch_decided_on_top_of_a_failed_write_is_not_applied_and_both_come_again() -> None:
    """Pipelining: batch 2 is decided on the state batch 1 is writing. When batch 1's write fails, batch
    2's completion fails too without writing, the cache forgets what was decided, and the redelivered
    batches end as if nothing had happened."""
    workflow = WorkflowBuilder("wf").add_step("a", "wa", compensation="ua").build()
    store = _BlockingStore()
    orchestrator = Orchestrator(workflow, InMemoryEventBus(), store)
    await orchestrator.start()
    try:
        topic = orchestrator.topics.start
        now = datetime.now(UTC)
        start = _start("tx", "s")
        cancel = CancelSaga(event_id="c", transaction_id="tx", workflow_id="wf", occurred_at=now)
        batch1, batch2 = [_inbound(topic, start, 0)], [_inbound(topic, cancel, 1)]
        release = store.hold = asyncio.Event()
        first = await orchestrator.pipeline.handle_batch(batch1)  # decided; its write now waits in the store
        handing = asyncio.create_task(orchestrator.pipeline.handle_batch(batch2))  # decided on top of batch 1
        await asyncio.sleep(0.05)
        assert not handing.done()  # at most one batch ahead: the handler waits for batch 1
        release.set()
        second = await handing
        with pytest.raises(StateStoreError):
            await first
        with pytest.raises(OrchestratorError, match="the batch before failed"):
            await second
        assert store.applies == 1  # batch 2 never reached the store
        assert await store.load_context("tx") is None
        assert not orchestrator.pipeline.cached
        # Redelivered, in order: the saga starts, then the cancel takes it.
        await (await orchestrator.pipeline.handle_batch(batch1))
        await (await orchestrator.pipeline.handle_batch(batch2))
        saga = await store.load_context("tx")
        assert saga is not None and saga.cancel_requested and saga.version == 2
    finally:
        await orchestrator.stop()


class _HeldBus(InMemoryEventBus):
    """Holds its next publish until released, then fails it; records what it published."""

    def __init__(self) -> None:
        super().__init__()
        self.hold: asyncio.Event | None = None
        self.gate: asyncio.Event | None = None  # while set here, every publish waits for it, then goes
        self.published: list[str] = []

    async def publish(self, messages: Sequence[OutboxMessage]) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.hold is not None:
            hold, self.hold = self.hold, None
            await hold.wait()
            raise EventBusError("the broker went away")
        self.published.extend(m.key for m in messages)
        await super().publish(messages)


@contextlib.asynccontextmanager
async def _one_step(bus: IEventBus, store: IStateStore) -> AsyncIterator[Orchestrator]:
    """A started orchestrator of a one-step workflow, stopped on the way out."""
    orchestrator = Orchestrator(WorkflowBuilder("wf").add_step("a", "wa").build(), bus, store)
    await orchestrator.start()
    try:
        yield orchestrator
    finally:
        await orchestrator.stop()


async def test_a_batch_is_written_while_the_one_before_publishes_but_never_published_before_it() -> None:
    store = _BlockingStore()
    bus = _HeldBus()
    async with _one_step(bus, store) as orchestrator:
        topic = orchestrator.topics.start
        starts = [_start(tx) for tx in ("one", "two")]
        batch1, batch2 = [_inbound(topic, starts[0], 0)], [_inbound(topic, starts[1], 1)]
        release = bus.hold = asyncio.Event()
        first = await orchestrator.pipeline.handle_batch(batch1)  # written; its publish is held
        second = await orchestrator.pipeline.handle_batch(batch2)  # returns once batch 1 is written
        await asyncio.sleep(0.05)
        assert store.applies == 2  # batch 2 is written while batch 1 still publishes ...
        assert bus.published == []  # ... but not published before it
        release.set()
        with pytest.raises(EventBusError):
            await first
        with pytest.raises(OrchestratorError, match="not published: the batch before failed"):
            await second
        assert bus.published == []
        assert await store.load_context("two") is not None  # its write stands
        # Redelivered: both are duplicates now, and their outboxes are published, in order.
        await (await orchestrator.pipeline.handle_batch(batch1))
        await (await orchestrator.pipeline.handle_batch(batch2))
        assert [key for key in bus.published if key in ("one", "two")][:1] == ["one"]
        assert {"one", "two"} <= set(bus.published)


def _result_inbound(topic: str, event_id: str, value: str, offset: int, run: str) -> InboundMessage:
    message = StepResult(
        event_id=event_id,
        transaction_id="tx",
        workflow_id="wf",
        occurred_at=datetime.now(UTC),
        body=ResultBody(
            command_id=command_id("tx", "a", "execute", 1, run),
            step="a",
            kind="execute",
            attempt=1,
            status="succeeded",
            result={"x": value},
        ),
    )
    return InboundMessage(topic, 0, offset, b"tx", encode(message))


async def test_a_batch_decided_on_a_write_that_conflicted_is_decided_again_not_applied() -> None:
    """Batch 1 is decided on a stale cached saga (another instance moved it one version on) and
    conflicts; batch 2, decided on batch 1's state, expects exactly the version the other instance
    wrote. The version check alone would let it through and lose the other instance's transition."""
    workflow = WorkflowBuilder("wf").add_step("a", "wa").add_step("b", "wb").build()
    store = InMemoryStateStore()
    mine, other = (
        Orchestrator(workflow, InMemoryEventBus(), store),
        Orchestrator(workflow, InMemoryEventBus(), store),
    )
    await mine.start()
    await other.event_bus.start()
    try:
        now = datetime.now(UTC)
        start = _start("tx", "s")
        await mine.process([start])  # mine caches version 1
        stored = await store.load_context("tx")
        assert stored is not None
        run = stored.run_id
        results = mine.topics.results
        await other.process([decode(_result_inbound(results, "r-other", "from other", 0, run).value)])  # type: ignore[list-item]
        # Decided on version 1, then on batch 1's version 2.
        first = await mine.pipeline.handle_batch([_result_inbound(results, "r-mine", "from mine", 1, run)])
        cancel = CancelSaga(event_id="c", transaction_id="tx", workflow_id="wf", occurred_at=now)
        second = await mine.pipeline.handle_batch([_inbound(mine.topics.start, cancel, 2)])
        await first
        await second
        saga = await store.load_context("tx")
        assert saga is not None
        assert saga.data == {"x": "from other"}  # the other instance's transition stands
        assert saga.cancel_requested and saga.version == 3
    finally:
        await mine.stop()


async def test_a_request_is_published_after_the_batch_in_flight() -> None:
    """execute_workflow decides on the stored sagas and publishes only after the batch the pipeline is
    still publishing, so a request never overtakes what a saga already sent."""
    bus = _HeldBus()
    store = InMemoryStateStore()
    async with _one_step(bus, store) as orchestrator:
        start = _start("one", "s")
        release = bus.hold = asyncio.Event()
        first = await orchestrator.pipeline.handle_batch([_inbound(orchestrator.topics.start, start, 0)])
        request = asyncio.create_task(orchestrator.execute_workflow("wf", {}, transaction_id="two"))
        await asyncio.sleep(0.05)
        assert await store.load_context("two") is not None  # written ...
        assert not request.done() and "two" not in bus.published  # ... but not published yet
        release.set()
        with pytest.raises(EventBusError):
            await first
        assert await request == "two"
        assert "two" in bus.published


async def test_at_most_two_batches_are_publishing_when_the_next_is_handed_back() -> None:
    bus = _HeldBus()
    async with _one_step(bus, InMemoryStateStore()) as orchestrator:
        topic = orchestrator.topics.start
        batches = [[_inbound(topic, _start(tx), n)] for n, tx in enumerate(("one", "two", "three"))]
        gate = bus.gate = asyncio.Event()
        try:
            first = await orchestrator.pipeline.handle_batch(batches[0])
            # Batch 1 is written: batch 2 is handed back at once.
            second = await orchestrator.pipeline.handle_batch(batches[1])
            third = asyncio.create_task(orchestrator.pipeline.handle_batch(batches[2]))
            await asyncio.sleep(0.05)
            assert not third.done()  # batches 1 and 2 still publishing: batch 3 waits for batch 1
            gate.set()
            await first
            await second
            await (await third)
            # a command and an audit each
            assert bus.published == ["one", "one", "two", "two", "three", "three"]
        finally:
            bus.gate = None


async def test_the_cache_holds_the_sagas_in_flight_not_those_that_ended() -> None:
    store = InMemoryStateStore()
    async with _one_step(InMemoryEventBus(), store) as orchestrator:
        pipeline, topics = orchestrator.pipeline, orchestrator.topics
        starts = [_inbound(topics.start, _start(f"tx-{i}"), i) for i in range(3)]
        await (await pipeline.handle_batch(starts))
        assert pipeline.cached == {"tx-0", "tx-1", "tx-2"}
        stored = await store.load_context("tx-1")
        assert stored is not None
        done = result("tx-1", "a", stored.run_id)
        await (await pipeline.handle_batch([InboundMessage(topics.results, 0, 0, b"tx-1", encode(done))]))
        assert pipeline.cached == {"tx-0", "tx-2"}
        status = await store.load_context("tx-1")
        assert status is not None and status.state.value == "completed"


async def test_an_instance_that_writes_over_another_ones_unpublished_write_leaves_it_for_the_sweep() -> None:
    """Instance A writes a saga's first transition and loses the broker before publishing it (as if it
    died). Instance B writes the next transition on top (a cancel, from another topic than the start A
    had) and publishes it. B's acknowledgement must forget only its own outbox entry: A's is still
    pending, for the sweep to publish."""
    store = InMemoryStateStore()
    held = _HeldBus()
    async with _one_step(InMemoryEventBus(), store) as b, _one_step(held, store) as a:
        held.hold = asyncio.Event()
        held.hold.set()  # A's publish fails at once
        with pytest.raises(EventBusError):
            await (await a.pipeline.handle_batch([_inbound(a.topics.start, _start("tx", "s"), 0)]))
        [pending] = await store.pending_outboxes()
        assert pending.outbox_id == 1
        now = datetime.now(UTC)
        cancel = CancelSaga(event_id="c", transaction_id="tx", workflow_id="wf", occurred_at=now)
        await (await b.pipeline.handle_batch([_inbound(b.topics.start, cancel, 1)]))
        await b.pipeline.drain(5.0)  # the acknowledgements are done
        left = {p.transaction_id: p.outbox_id for p in await store.pending_outboxes()}
    assert left.get("tx") == 1  # A's entry, unpublished, is still there


async def test_a_result_of_the_run_another_instance_started_is_not_dead_lettered_on_a_stale_guess() -> None:
    """This instance started the saga (run A) and keeps that state; meanwhile the saga was started under
    another run (B) by an instance that had the partition, and B's is the one stored. A result of run B
    decided on the kept run A looks like another run's: it is decided again on the stored saga, and
    applied, rather than dead-lettered."""
    workflow = WorkflowBuilder("wf").add_step("a", "wa").add_step("b", "wb").build()
    store = InMemoryStateStore()
    mine = Orchestrator(workflow, InMemoryEventBus(), store)
    other = Orchestrator(workflow, InMemoryEventBus(), store)
    await mine.start()
    await other.event_bus.start()
    try:
        topics = mine.topics
        await (await mine.pipeline.handle_batch([_inbound(topics.start, _start("tx", "s1"), 0)]))
        assert "tx" in mine.pipeline.cached
        guessed = await store.load_context("tx")
        assert guessed is not None
        # The other instance's run is the one stored (as if its write had won).
        assert await store.delete_context("tx")
        await other.process([_start("tx", "s2")])
        stored = await store.load_context("tx")
        assert stored is not None and stored.run_id != guessed.run_id
        answer = InboundMessage(topics.results, 0, 0, b"tx", encode(result("tx", "a", stored.run_id)))
        await (await mine.pipeline.handle_batch([answer]))
        saga = await store.load_context("tx")
        assert saga is not None and saga.completed == ["a"] and saga.run_id == stored.run_id
        assert mine.event_bus.messages(topics.dlq) == []  # type: ignore[attr-defined]
    finally:
        await mine.stop()
        await other.event_bus.stop()
