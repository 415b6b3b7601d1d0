"""The IStateStore contract, run against every implementation alike."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from orchestrator_kafka import InMemoryStateStore, SagaContext, WorkflowState
from orchestrator_kafka.errors import ValidationError
from orchestrator_kafka.ports import IStateStore, OutboxMessage, Timer, TransitionWrite

from ..conftest import require_redis, unique


def saga(tx: str, version: int, state: WorkflowState = WorkflowState.RUNNING, wf: str = "wf") -> SagaContext:
    now = datetime.now(UTC)
    return SagaContext(
        transaction_id=tx, workflow_id=wf, state=state, version=version, created_at=now, updated_at=now
    )


def msg(n: int) -> OutboxMessage:
    return OutboxMessage(
        "saga.commands.w", f"tx-{n}", b"\x00\xff binary " + str(n).encode(), (("h", b"\xfe\x01"),)
    )


def timer(tx: str, timer_id: str, due: float) -> Timer:
    return Timer(timer_id, tx, due, "retry", "step", "execute", 2)


class StateStoreContract:
    """Subclasses provide a ``store`` fixture."""

    async def test_save_load_delete_and_list(self, store: IStateStore) -> None:
        assert await store.load_context("nope") is None
        await store.save_context(saga("a", 1, WorkflowState.RUNNING, "w1"))
        await store.save_context(saga("b", 1, WorkflowState.COMPLETED, "w1"))
        await store.save_context(saga("c", 1, WorkflowState.COMPLETED, "w2"))
        loaded = await store.load_context("a")
        assert loaded is not None and loaded.transaction_id == "a" and loaded.state is WorkflowState.RUNNING
        assert await store.list_contexts() == ["a", "b", "c"]
        assert await store.list_contexts(workflow_id="w1") == ["a", "b"]
        assert await store.list_contexts(state="completed") == ["b", "c"]
        assert await store.list_contexts(workflow_id="w1", state="completed") == ["b"]
        assert await store.list_contexts(workflow_id="w3") == []
        await store.save_context(saga("a", 2, WorkflowState.COMPLETED, "w1"))
        assert await store.list_contexts(state="running") == []
        assert await store.list_contexts(state="completed") == ["a", "b", "c"]
        assert await store.delete_context("a") is True
        assert await store.delete_context("a") is False
        assert await store.load_context("a") is None
        assert await store.list_contexts(workflow_id="w1") == ["b"]
        assert set(await store.load_contexts(["a", "b", "c", "zz"])) == {"b", "c"}

    async def test_an_invalid_saga_is_refused_and_nothing_written(self, store: IStateStore) -> None:
        bad = SagaContext(transaction_id="t1", workflow_id="wf", state="nonsense")  # type: ignore[arg-type]
        with pytest.raises(ValidationError, match="not a valid saga"):
            await store.save_context(bad)
        with pytest.raises(ValidationError, match="expected a SagaContext"):
            await store.save_context({"transaction_id": "t1"})  # type: ignore[arg-type]
        assert await store.load_context("t1") is None

    async def test_a_loaded_saga_is_a_copy(self, store: IStateStore) -> None:
        original = saga("a", 1)
        original.data["items"] = [1]
        await store.save_context(original)
        original.data["items"].append(2)
        loaded = await store.load_context("a")
        assert loaded is not None and loaded.data == {"items": [1]}
        loaded.data["items"].append(3)
        again = await store.load_context("a")
        assert again is not None and again.data == {"items": [1]}

    async def test_apply_creates_then_versions_then_detects_conflicts(self, store: IStateStore) -> None:
        [created] = await store.apply([TransitionWrite("e1", "tx", 0, saga("tx", 1), (msg(1),))])
        assert created.status == "applied" and created.outbox == (msg(1),) and created.outbox_id == 1
        [again] = await store.apply([TransitionWrite("e2", "tx", 0, saga("tx", 1))])
        assert again.status == "conflict"
        [stale] = await store.apply([TransitionWrite("e3", "tx", 5, saga("tx", 6))])
        assert stale.status == "conflict"
        [moved] = await store.apply([TransitionWrite("e4", "tx", 1, saga("tx", 2, WorkflowState.COMPLETED))])
        assert moved.status == "applied"
        loaded = await store.load_context("tx")
        assert loaded is not None and loaded.version == 2 and loaded.state is WorkflowState.COMPLETED
        assert await store.list_contexts(state="completed") == ["tx"]
        assert await store.list_contexts(state="running") == []

    async def test_a_processed_event_is_a_duplicate_and_returns_the_outbox(self, store: IStateStore) -> None:
        await store.apply([TransitionWrite("e1", "tx", 0, saga("tx", 1), (msg(1),))])
        [dup] = await store.apply([TransitionWrite("e1", "tx", 1, saga("tx", 2), (msg(2),))])
        assert dup.status == "duplicate" and dup.outbox == (msg(1),)
        # The check applies to writes that change nothing too: a redelivered event re-publishes.
        [dup_unchanged] = await store.apply([TransitionWrite("e1", "tx", 1)])
        assert dup_unchanged.status == "duplicate" and dup_unchanged.outbox == (msg(1),)
        loaded = await store.load_context("tx")
        assert loaded is not None and loaded.version == 1

    async def test_a_batch_applies_in_order_and_a_conflict_poisons_the_rest_of_its_saga(
        self, store: IStateStore
    ) -> None:
        await store.apply([TransitionWrite("e0", "b", 0, saga("b", 1))])
        results = await store.apply(
            [
                TransitionWrite("e1", "a", 0, saga("a", 1), (msg(1),)),
                TransitionWrite("e2", "a", 1, saga("a", 2), (msg(2),)),
                TransitionWrite("e3", "b", 7, saga("b", 8)),  # conflict
                TransitionWrite("e4", "b", 1, saga("b", 2)),  # matches the store, but follows a conflict
                TransitionWrite("e5", "c", 0, saga("c", 1)),
            ]
        )
        assert [r.status for r in results] == ["applied", "applied", "conflict", "conflict", "applied"]
        assert results[1].outbox == (msg(2),) and results[1].outbox_id == 2  # its own messages only
        [pending] = await store.pending_outboxes()
        assert pending.messages == (msg(1), msg(2))
        b = await store.load_context("b")
        assert b is not None and b.version == 1

    async def test_outbox_ack_and_recovery_sweep(self, store: IStateStore) -> None:
        await store.apply([TransitionWrite("e1", "tx", 0, saga("tx", 1), (msg(1),))])
        await store.apply([TransitionWrite("e2", "tx", 1, saga("tx", 2), (msg(2), msg(3)))])
        await store.apply([TransitionWrite("e3", "other", 0, saga("other", 1))])  # nothing to publish
        [pending] = await store.pending_outboxes()
        assert pending.transaction_id == "tx" and pending.outbox_id == 2
        assert pending.messages == (msg(1), msg(2), msg(3))
        await store.ack_outbox([("tx", 1)])
        [pending] = await store.pending_outboxes()
        assert pending.messages == (msg(2), msg(3))
        await store.ack_outbox([("tx", 2)])
        assert await store.pending_outboxes() == []
        [dup] = await store.apply([TransitionWrite("e2", "tx", 2)])
        assert dup.status == "duplicate" and dup.outbox == ()

    async def test_timers_are_claimed_when_due_leased_and_cancelled_by_a_write(
        self, store: IStateStore
    ) -> None:
        t1, t2, t3 = timer("tx", "t1", 100.0), timer("tx", "t2", 200.0), timer("tx", "t3", 300.0)
        await store.apply([TransitionWrite("e1", "tx", 0, saga("tx", 1), timers=(t1, t2, t3))])
        assert await store.claim_due_timers(50.0, 10, 30.0) == []
        assert await store.claim_due_timers(250.0, 10, 30.0) == [t1, t2]
        assert await store.claim_due_timers(260.0, 10, 30.0) == []  # leased
        assert await store.claim_due_timers(281.0, 1, 30.0) == [t1]  # lease over, claimed again, one at most
        [unchanged] = await store.apply([TransitionWrite("timer:t1", "tx", 1, cancel_timers=("t1",))])
        assert unchanged.status == "unchanged"
        await store.apply([TransitionWrite("e2", "tx", 1, saga("tx", 2), cancel_timers=("t2",))])
        assert await store.claim_due_timers(1000.0, 10, 30.0) == [t3]
        # A stale version does not delete timers either: nothing is written on a conflict.
        [conflict] = await store.apply([TransitionWrite("e3", "tx", 1, cancel_timers=("t3",))])
        assert conflict.status == "conflict"
        assert await store.claim_due_timers(2000.0, 10, 30.0) == [t3]

    async def test_deleting_a_saga_deletes_its_outbox_and_timers(self, store: IStateStore) -> None:
        await store.apply(
            [TransitionWrite("e1", "tx", 0, saga("tx", 1), (msg(1),), (timer("tx", "t1", 1.0),))]
        )
        assert await store.delete_context("tx") is True
        assert await store.pending_outboxes() == []
        assert await store.claim_due_timers(10.0, 10, 30.0) == []
        assert await store.list_contexts() == []


class TestInMemoryStateStore(StateStoreContract):
    @pytest.fixture
    async def store(self) -> AsyncIterator[IStateStore]:
        yield InMemoryStateStore()


@pytest.mark.redis
class TestRedisStateStore(StateStoreContract):
    @pytest.fixture
    async def store(self) -> AsyncIterator[IStateStore]:
        from orchestrator_kafka import RedisStateStore

        url = require_redis()
        prefix = unique("contract")
        store = RedisStateStore(url, key_prefix=prefix)
        yield store
        import redis.asyncio as aioredis

        client = aioredis.from_url(url)
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
        await store.close()
