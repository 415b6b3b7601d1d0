"""The IStateStore contract, run against every implementation alike.

Each implementation's test class provides a ``stores`` fixture (see :class:`Stores`): it makes stores
and lets time pass for them, the memory store's on a fake clock, the Redis store's by ageing its keys.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import pytest

from orchestrator_kafka import InMemoryStateStore, SagaContext, WorkflowState
from orchestrator_kafka.constants import DEDUPE_TTL_SECONDS, EVENTS_KEPT
from orchestrator_kafka.context import StepStatus
from orchestrator_kafka.errors import StateStoreError, ValidationError
from orchestrator_kafka.ports import ApplyResult, IStateStore, OutboxMessage, Timer, TransitionWrite

from ..conftest import RedisStores

T0 = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


def saga(
    tx: str,
    version: int,
    state: WorkflowState = WorkflowState.RUNNING,
    wf: str = "orders",
    updated_at: datetime = T0,
) -> SagaContext:
    return SagaContext(
        transaction_id=tx,
        workflow_id=wf,
        state=state,
        version=version,
        data={"n": version},
        created_at=T0,
        updated_at=updated_at,
    )


def msg(n: int, value: bytes | None = None) -> OutboxMessage:
    return OutboxMessage(
        "saga.commands.w",
        f"tx-{n}",
        b"\x00\xff binary " + str(n).encode() if value is None else value,
        (("h", b"\xfe\x01"),),
    )


def timer(tx: str, timer_id: str, due: float, *, attempt: int = 2, command_id: str | None = None) -> Timer:
    return Timer(timer_id, tx, due, "retry", "step", "execute", attempt, command_id)


def create(tx: str, event: str = "", **kw: Any) -> TransitionWrite:
    """The write that creates ``tx`` at version 1; its event id is ``<tx>-create`` unless given."""
    return TransitionWrite(event or f"{tx}-create", tx, 0, saga(tx, 1), **kw)


def step(tx: str, version: int, event: str, **kw: Any) -> TransitionWrite:
    """The write that moves ``tx`` from ``version`` to ``version + 1``."""
    state = kw.pop("state", WorkflowState.RUNNING)
    return TransitionWrite(event, tx, version, saga(tx, version + 1, state), **kw)


def every_method(store: IStateStore) -> list[Callable[[], Awaitable[object]]]:
    """A call of each method of ``store`` that has to reach its data, to be made one at a time."""
    return [
        lambda: store.apply([step("t1", 1, "e2")]),
        lambda: store.load_context("t1"),
        lambda: store.load_contexts(["t1"]),
        lambda: store.save_context(saga("t2", 1)),
        lambda: store.delete_context("t1"),
        lambda: store.list_contexts(),
        lambda: store.list_contexts("orders", "running"),
        lambda: store.ack_outbox([("t1", 1)]),
        lambda: store.pending_outboxes(),
        lambda: store.claim_due_timers(10.0, 10, 30.0),
        lambda: store.list_sagas(),
        lambda: store.trim(T0.timestamp()),
    ]


class Stores(Protocol):
    """Makes stores of one implementation, closed at the end of the test."""

    def __call__(self, *, dedupe_ttl: int = DEDUPE_TTL_SECONDS, **retention: int | None) -> IStateStore:
        """A store; ``retention`` and ``failed_retention`` go to it when given."""

    async def pass_time(self, seconds: float) -> None:
        """Let ``seconds`` pass for every store made, as far as their processed event ids go."""


class StateStoreContract:
    """Subclasses provide a ``stores`` fixture (:class:`Stores`)."""

    @pytest.fixture
    def store(self, stores: Stores) -> IStateStore:
        return stores()

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
        original.data = {"items": [1]}
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

    # ------------------------------------------------------------ apply

    async def test_create_then_load(self, store: IStateStore) -> None:
        [res] = await store.apply([create("t1", outbox=(msg(1),))])
        assert res == ApplyResult("applied", "t1", 1, (msg(1),))
        loaded = await store.load_context("t1")
        assert loaded == saga("t1", 1)
        assert await store.load_context("nope") is None

    async def test_create_twice_conflicts(self, store: IStateStore) -> None:
        await store.apply([create("t1")])
        [res] = await store.apply([create("t1", event="another-start")])
        assert res == ApplyResult("conflict", "t1")
        assert (await store.load_context("t1")) == saga("t1", 1)

    async def test_version_conflict_writes_nothing(self, store: IStateStore) -> None:
        await store.apply([create("t1")])
        bad = TransitionWrite(
            "e2", "t1", 5, saga("t1", 6), outbox=(msg(2),), timers=(timer("t1", "tm", 1.0),)
        )
        [res] = await store.apply([bad])
        assert res == ApplyResult("conflict", "t1")
        assert (await store.load_context("t1")) == saga("t1", 1)
        assert await store.pending_outboxes() == []
        assert await store.claim_due_timers(10.0, 10, 30.0) == []
        # The event id was not recorded: the same event applies once the version is right.
        [res] = await store.apply([step("t1", 1, "e2")])
        assert res.status == "applied"

    async def test_duplicate_returns_current_outbox_and_writes_nothing(self, store: IStateStore) -> None:
        await store.apply([create("t1", outbox=(msg(1),))])
        [res] = await store.apply([step("t1", 1, "e2", outbox=(msg(2),))])
        assert res == ApplyResult("applied", "t1", 2, (msg(2),))  # its own messages only
        # Redelivered: whatever version the client now expects, the outcome is the stored one.
        for expected in (1, 2, 7):
            write = TransitionWrite("e2", "t1", expected, saga("t1", expected + 1), outbox=(msg(9),))
            [dup] = await store.apply([write])
            assert dup == ApplyResult("duplicate", "t1", 2, (msg(1), msg(2)))
        assert (await store.load_context("t1")) == saga("t1", 2)
        await store.ack_outbox([("t1", 2)])
        [dup] = await store.apply([create("t1")])
        assert dup == ApplyResult("duplicate", "t1", 0, ())

    async def test_duplicate_within_one_batch(self, store: IStateStore) -> None:
        results = await store.apply([create("t1"), create("t1")])
        assert [r.status for r in results] == ["applied", "duplicate"]

    async def test_an_event_id_is_remembered_per_saga(self, store: IStateStore) -> None:
        results = await store.apply([create("a", event="e"), create("b", event="e")])
        assert [r.status for r in results] == ["applied", "applied"]
        [dup] = await store.apply([create("b", event="e")])
        assert dup.status == "duplicate"

    async def test_conflict_chain_in_one_batch(self, store: IStateStore) -> None:
        await store.apply([create("a"), create("b")])
        results = await store.apply(
            [
                step("a", 1, "a2"),  # applied: a is at 2
                step("a", 1, "a-stale"),  # conflict: a is at 2
                step("a", 2, "a3"),  # would match, but was computed on top of the conflicting write
                step("b", 1, "b2"),  # another transaction is not affected
                step("a", 3, "a4"),  # still a conflict
                create("a", event="a2"),  # but a processed event is still recognised first
            ]
        )
        assert [r.status for r in results] == [
            "applied",
            "conflict",
            "conflict",
            "applied",
            "conflict",
            "duplicate",
        ]
        assert (await store.load_context("a")) == saga("a", 2)
        assert (await store.load_context("b")) == saga("b", 2)
        # The next batch starts afresh.
        [res] = await store.apply([step("a", 2, "a3")])
        assert res.status == "applied"

    async def test_sequential_writes_of_one_saga_in_one_batch(self, store: IStateStore) -> None:
        results = await store.apply(
            [
                create("t1", outbox=(msg(1),)),
                step("t1", 1, "e2"),
                step("t1", 2, "e3", outbox=(msg(3), msg(4))),
            ]
        )
        assert results == [
            ApplyResult("applied", "t1", 1, (msg(1),)),
            ApplyResult("applied", "t1", 0, ()),
            ApplyResult("applied", "t1", 3, (msg(3), msg(4))),
        ]
        assert (await store.load_context("t1")) == saga("t1", 3)

    async def test_unchanged_cancels_timers_only(self, store: IStateStore) -> None:
        await store.apply(
            [create("t1", outbox=(msg(1),), timers=(timer("t1", "x", 5.0), timer("t1", "y", 6.0)))]
        )
        [res] = await store.apply([TransitionWrite("noop", "t1", 1, None, cancel_timers=("x", "unknown"))])
        # No outbox is returned for unchanged, even though one is pending.
        assert res == ApplyResult("unchanged", "t1")
        assert [t.timer_id for t in await store.claim_due_timers(10.0, 10, 30.0)] == ["y"]
        assert (await store.load_context("t1")) == saga("t1", 1)
        # The event id was not recorded.
        [res] = await store.apply([step("t1", 1, "noop")])
        assert res.status == "applied"

    async def test_unchanged_with_wrong_version_conflicts_and_keeps_timers(self, store: IStateStore) -> None:
        await store.apply([create("t1", timers=(timer("t1", "x", 5.0),))])
        [res] = await store.apply([TransitionWrite("noop", "t1", 3, None, cancel_timers=("x",))])
        assert res.status == "conflict"
        assert [t.timer_id for t in await store.claim_due_timers(10.0, 10, 30.0)] == ["x"]

    async def test_unchanged_for_missing_saga(self, store: IStateStore) -> None:
        [res] = await store.apply([TransitionWrite("e", "ghost", 0, None)])
        assert res == ApplyResult("unchanged", "ghost")
        assert await store.load_context("ghost") is None
        assert await store.list_contexts() == []

    async def test_a_batch_with_one_invalid_write_is_refused_whole(self, store: IStateStore) -> None:
        with pytest.raises(ValidationError):
            await store.apply([create("ok"), TransitionWrite("e", "t1", 0, saga("t1", 2))])
        with pytest.raises(ValidationError):
            await store.apply([TransitionWrite("e", "t1", 0, saga("other", 1))])
        unstorable = saga("t2", 1)
        unstorable.data["x"] = object()
        with pytest.raises(ValidationError):
            await store.apply([create("ok"), TransitionWrite("e", "t2", 0, unstorable)])
        assert await store.load_context("ok") is None
        assert await store.list_contexts() == []
        # Nothing of the refused batches was recorded: their events apply afresh.
        [res] = await store.apply([create("ok")])
        assert res.status == "applied"
        assert await store.apply([]) == []

    async def test_a_saga_remembers_its_recent_events_and_a_deleted_one_for_dedupe_ttl(
        self, stores: Stores
    ) -> None:
        store = stores(dedupe_ttl=100)
        await store.apply([create("t1", outbox=(msg(1),))])
        v = 1
        for n in range(EVENTS_KEPT - 1):
            [res] = await store.apply([step("t1", v, f"e{n}")])
            assert res.status == "applied"
            v += 1
        await stores.pass_time(10 * DEDUPE_TTL_SECONDS)  # time alone forgets nothing of a live saga
        [dup] = await store.apply([create("t1")])  # the oldest of its last EVENTS_KEPT events
        assert dup == ApplyResult("duplicate", "t1", 1, (msg(1),))
        # Neither a conflict nor an unchanged write is remembered.
        [conflict] = await store.apply([step("t1", 99, "x")])
        assert conflict.status == "conflict"
        [unchanged] = await store.apply([TransitionWrite("u", "t1", v)])
        assert unchanged.status == "unchanged"
        [res] = await store.apply([step("t1", v, "x")])
        assert res.status == "applied"
        v += 1
        [res] = await store.apply([TransitionWrite("u", "t1", v, saga("t1", v + 1))])
        assert res.status == "applied"
        v += 1
        # Pushed out by newer events: an older duplicate is the engine's to recognise, from the saga.
        [again] = await store.apply([TransitionWrite("t1-create", "t1", v, saga("t1", v + 1))])
        assert again.status == "applied"
        [dup] = await store.apply([step("t1", 5, "x")])
        assert dup.status == "duplicate"
        # A deleted saga's recent events stay known for dedupe_ttl, then a start begins it anew.
        assert await store.delete_context("t1") is True
        [dup] = await store.apply([TransitionWrite("x", "t1", 0, saga("t1", 1))])
        assert dup == ApplyResult("duplicate", "t1", 0, ())
        await stores.pass_time(99)
        [dup] = await store.apply([TransitionWrite("u", "t1", 0, saga("t1", 1))])
        assert dup.status == "duplicate"
        await stores.pass_time(2)
        [res] = await store.apply([TransitionWrite("x", "t1", 0, saga("t1", 1))])
        assert res.status == "applied"

    async def test_a_dedupe_ttl_that_is_not_positive_is_refused(self, stores: Stores) -> None:
        for bad in (0, -1):
            with pytest.raises(ValidationError, match="dedupe_ttl"):
                stores(dedupe_ttl=bad)

    # ------------------------------------------------------------ outboxes

    async def test_outbox_ack_and_pending(self, store: IStateStore) -> None:
        await store.apply([create("a", outbox=(msg(1),)), create("b", outbox=(msg(2), msg(3))), create("c")])
        [res] = await store.apply([step("a", 1, "a2", outbox=(msg(4),))])
        assert res == ApplyResult("applied", "a", 2, (msg(4),))
        pending = {p.transaction_id: (p.outbox_id, p.messages) for p in await store.pending_outboxes()}
        assert pending == {"a": (2, (msg(1), msg(4))), "b": (1, (msg(2), msg(3)))}
        assert len(await store.pending_outboxes(limit=1)) == 1
        assert await store.pending_outboxes(limit=0) == []
        assert await store.pending_outboxes(limit=-1) == []

        await store.ack_outbox([("a", 1)])  # only the older entry
        pending = {p.transaction_id: (p.outbox_id, p.messages) for p in await store.pending_outboxes()}
        assert pending == {"a": (2, (msg(4),)), "b": (1, (msg(2), msg(3)))}

        # A write after the publish but before its ack: the ack keeps the newer entry.
        await store.apply([step("a", 2, "a3", outbox=(msg(5),))])
        await store.ack_outbox([("a", 2), ("b", 1), ("ghost", 9)])
        pending = {p.transaction_id: (p.outbox_id, p.messages) for p in await store.pending_outboxes()}
        assert pending == {"a": (3, (msg(5),))}
        await store.ack_outbox([("a", 3)])
        assert await store.pending_outboxes() == []
        await store.ack_outbox([])
        [res] = await store.apply([step("a", 3, "a4")])
        assert res == ApplyResult("applied", "a", 0, ())

    async def test_an_ack_of_only_its_own_entry_keeps_an_older_one_for_the_sweep(
        self, store: IStateStore
    ) -> None:
        """Another instance wrote version 1 and died before publishing it; this one wrote version 2 on top
        and published it. Its ack must not take version 1's entry with it: the sweep still finds it."""
        await store.apply([create("a", outbox=(msg(1),))])
        await store.apply([step("a", 1, "a2", outbox=(msg(2),))])
        await store.ack_outbox([("a", 2)], only=True)
        pending = {p.transaction_id: (p.outbox_id, p.messages) for p in await store.pending_outboxes()}
        assert pending == {"a": (1, (msg(1),))}
        await store.ack_outbox([("a", 5)], only=True)  # no such entry: nothing goes
        assert len(await store.pending_outboxes()) == 1
        await store.ack_outbox([("a", 1)], only=True)
        assert await store.pending_outboxes() == []

    async def test_outbox_entries_stay_in_outbox_id_order_after_a_repair(self, store: IStateStore) -> None:
        await store.apply(
            [create("t1", outbox=(msg(1),)), step("t1", 1, "e2"), step("t1", 2, "e3", outbox=(msg(3),))]
        )
        await store.save_context(saga("t1", 1))  # an operator moves the saga back
        [res] = await store.apply([step("t1", 1, "e2-again", outbox=(msg(2),))])
        assert res == ApplyResult("applied", "t1", 2, (msg(2),))
        [pending] = await store.pending_outboxes()
        assert (pending.outbox_id, pending.messages) == (3, (msg(1), msg(2), msg(3)))
        [dup] = await store.apply([create("t1")])
        assert dup == ApplyResult("duplicate", "t1", 3, (msg(1), msg(2), msg(3)))

    async def test_pending_outboxes_many(self, store: IStateStore) -> None:
        await store.apply([create(f"t{i:03}", outbox=(msg(i),)) for i in range(450)])
        assert len(await store.pending_outboxes(limit=1000)) == 450
        assert len(await store.pending_outboxes(limit=300)) == 300
        found = {p.transaction_id: p.messages for p in await store.pending_outboxes()}
        assert found["t123"] == (msg(123),)

    async def test_bytes_round_trip_exactly(self, store: IStateStore) -> None:
        every_byte = bytes(range(256))
        odd = OutboxMessage(
            "sagä.commands.ünïcode",
            "ключ-\u20ac",
            every_byte + b'"\\\n\x00{"',
            (
                ("traceparent", b"00-abc-01"),
                ("bin", b"\xff\xfe\x80\x00\xc3"),
                ("empty", b""),
                ("ü", "é".encode()),
            ),
        )
        empty = OutboxMessage("t", "", b"", ())
        [res] = await store.apply([create("t1", outbox=(odd, empty))])
        assert res.outbox == (odd, empty)
        [dup] = await store.apply([create("t1")])
        assert dup.outbox == (odd, empty)
        assert dup.outbox[0].value == odd.value
        assert dict(dup.outbox[0].headers)["bin"] == b"\xff\xfe\x80\x00\xc3"
        [pending] = await store.pending_outboxes()
        assert pending.messages == (odd, empty)

    async def test_outbox_messages_keep_any_bytes(self, store: IStateStore) -> None:
        awkward = OutboxMessage("saga.events", "k\n{", b'\n\x00\xff{"a":"\\n"}\n', (("h\n", b"\xff\n\x00"),))
        messages = (msg(1), awkward, msg(3, b""))
        await store.apply([create("t1", outbox=messages)])
        [duplicate] = await store.apply([create("t1")])  # the same event again: the outbox comes back
        assert duplicate.status == "duplicate" and duplicate.outbox == messages
        [pending] = await store.pending_outboxes()
        assert pending.messages == messages

    async def test_saga_json_round_trip(self, store: IStateStore) -> None:
        ctx = SagaContext(
            transaction_id="tx-ü{}:*",
            workflow_id="wf ü",
            state=WorkflowState.COMPENSATING,
            current_step="pay",
            data={"s": 'q"uote\\ \u20ac \x01', "f": 0.1, "big": 2**60, "nested": [1, {"a": None}]},
            step_results={"pay": {"ok": True}},
            error="boom",
            version=1,
            completed=["reserve"],
        )
        ctx.step("pay").status = StepStatus.COMPENSATING
        await store.apply([TransitionWrite("e1", ctx.transaction_id, 0, ctx)])
        assert (await store.load_context(ctx.transaction_id)) == ctx
        assert await store.list_contexts("wf ü", "compensating") == [ctx.transaction_id]

    # ------------------------------------------------------------ timers

    async def test_timers_claim_lease_and_reclaim(self, store: IStateStore) -> None:
        t1 = timer("a", "tm1", 100.0, attempt=3, command_id="cmd-1")
        t2 = timer("a", "tm2", 105.5)
        t3 = timer("b", "tm3", 200.0)
        await store.apply([create("a", timers=(t1, t2)), create("b", timers=(t3,))])

        assert await store.claim_due_timers(99.9, 10, 30.0) == []
        assert await store.claim_due_timers(110.0, 1, 30.0) == [t1]  # earliest first, up to limit
        assert await store.claim_due_timers(110.0, 10, 30.0) == [t2]  # t1 is leased until 140
        assert await store.claim_due_timers(139.0, 10, 30.0) == []
        assert await store.claim_due_timers(140.0, 10, 30.0) == [t1, t2]  # their claimers never handled them
        assert await store.claim_due_timers(140.0, 0, 30.0) == []
        # Claims never delete; the write that handles a timer cancels it.
        [res] = await store.apply([step("a", 1, "fired", cancel_timers=("tm1", "tm2"))])
        assert res.status == "applied"
        assert await store.claim_due_timers(1000.0, 10, 30.0) == [t3]

    async def test_timer_rescheduled_by_a_later_write(self, store: IStateStore) -> None:
        await store.apply([create("a", timers=(timer("a", "tm", 50.0),))])
        later = timer("a", "tm", 500.0, attempt=3)
        await store.apply([step("a", 1, "retry", timers=(later,))])
        assert await store.claim_due_timers(100.0, 10, 30.0) == []
        assert await store.claim_due_timers(500.0, 10, 30.0) == [later]

    async def test_many_timers_in_one_write(self, store: IStateStore) -> None:
        """Thousands of timers in one write (Redis sends variadic commands in chunks for them)."""
        many = tuple(timer("a", f"tm{i}", float(i)) for i in range(2500))
        await store.apply([create("a", timers=many)])
        assert len(await store.claim_due_timers(10_000.0, 5000, 30.0)) == 2500
        ids = tuple(f"tm{i}" for i in range(2000)) + tuple(f"ghost{i}" for i in range(1500))
        await store.apply([step("a", 1, "cancel-many", cancel_timers=ids)])
        left = await store.claim_due_timers(20_000.0, 5000, 30.0)
        assert sorted(t.timer_id for t in left) == sorted(f"tm{i}" for i in range(2000, 2500))
        assert await store.delete_context("a") is True
        assert await store.claim_due_timers(30_000.0, 5000, 30.0) == []

    async def test_fractional_due_times(self, store: IStateStore) -> None:
        now = time.time()
        t = timer("a", "tm", now + 0.25)
        await store.apply([create("a", timers=(t,))])
        assert await store.claim_due_timers(now + 0.2499, 10, 30.0) == []
        assert await store.claim_due_timers(now + 0.25, 10, 30.0) == [t]

    # ------------------------------------------------------------ indexes and operator calls

    async def test_indexes_follow_state_changes(self, store: IStateStore) -> None:
        await store.apply(
            [create("a"), create("b"), TransitionWrite("c1", "c", 0, saga("c", 1, wf="refunds"))]
        )
        assert await store.list_contexts() == ["a", "b", "c"]
        assert await store.list_contexts("orders") == ["a", "b"]
        assert await store.list_contexts(state="running") == ["a", "b", "c"]
        await store.apply([step("a", 1, "a2", state=WorkflowState.COMPLETED)])
        assert await store.list_contexts(state=WorkflowState.COMPLETED) == ["a"]
        assert await store.list_contexts("orders", "running") == ["b"]
        assert await store.list_contexts("orders", "completed") == ["a"]
        assert await store.list_contexts("refunds", "completed") == []
        assert await store.list_contexts("nope") == []
        assert await store.list_contexts(state="running") == ["b", "c"]

    async def test_repair_then_load_delete_and_list(self, store: IStateStore) -> None:
        ctx = saga("s1", 7, WorkflowState.FAILED)
        await store.save_context(ctx)
        assert (await store.load_context("s1")) == ctx
        assert await store.list_contexts("orders", "failed") == ["s1"]
        # Overwrite as is (an operator's repair): a lower version and another workflow are taken as given.
        repaired = saga("s1", 3, WorkflowState.RUNNING, wf="other")
        await store.save_context(repaired)
        assert (await store.load_context("s1")) == repaired
        assert await store.list_contexts("orders") == []
        assert await store.list_contexts(state="failed") == []
        assert await store.list_contexts("other", "running") == ["s1"]
        [res] = await store.apply([step("s1", 3, "after-repair")])
        assert res.status == "applied"

        await store.apply([create("d1", outbox=(msg(1),), timers=(timer("d1", "dt", 1.0),))])
        assert await store.load_contexts(["d1", "missing", "s1"]) == {
            "d1": saga("d1", 1),
            "s1": saga("s1", 4),
        }
        assert await store.load_contexts([]) == {}
        assert await store.delete_context("d1") is True
        assert await store.delete_context("d1") is False
        assert await store.load_context("d1") is None
        assert await store.list_contexts() == ["s1"]
        assert await store.pending_outboxes() == []
        assert await store.claim_due_timers(10.0, 10, 30.0) == []
        # A late redelivery of the deleted saga's start is still a duplicate.
        [dup] = await store.apply([create("d1")])
        assert dup.status == "duplicate"
        assert await store.load_context("d1") is None

    async def test_load_contexts_many(self, store: IStateStore) -> None:
        await store.apply([create(f"t{i}") for i in range(300)])
        loaded = await store.load_contexts([f"t{i}" for i in range(0, 320, 2)])
        assert sorted(loaded) == sorted(f"t{i}" for i in range(0, 300, 2))
        assert loaded["t42"] == saga("t42", 1)

    # ------------------------------------------------------------ retention

    async def test_ended_sagas_expire_after_their_retention_and_unfinished_ones_never(
        self, stores: Stores
    ) -> None:
        store = stores(retention=100, failed_retention=1000)
        await store.apply([create(tx) for tx in ("done", "failed", "running", "comp", "cancelled")])
        await store.apply(
            [
                step("done", 1, "d2", state=WorkflowState.COMPLETED, outbox=(msg(1),)),
                step("failed", 1, "f2", state=WorkflowState.FAILED),
                step("comp", 1, "c2", state=WorkflowState.COMPENSATED),
                step("cancelled", 1, "x2", state=WorkflowState.CANCELLED),
            ]
        )
        await stores.pass_time(99)
        assert await store.trim(T0.timestamp() + 99) == 0
        assert len(await store.load_contexts(["done", "failed", "running", "comp", "cancelled"])) == 5

        await stores.pass_time(2)
        assert await store.load_context("done") is None
        assert await store.load_contexts(["done", "comp", "cancelled", "failed"]) == {
            "failed": saga("failed", 2, WorkflowState.FAILED)
        }
        assert await store.pending_outboxes() == []  # the outbox went with the saga
        await store.trim(T0.timestamp() + 101)  # how many it counts depends on what was read since
        assert await store.list_contexts() == ["failed", "running"]
        assert await store.list_contexts(state="completed") == []
        assert (await store.list_sagas(state="completed")) == ([], None)

        await stores.pass_time(1000)
        assert await store.trim(T0.timestamp() + 1101) == 1
        assert await store.list_contexts() == ["running"]
        assert await store.load_context("running") == saga("running", 1)
        assert await store.trim(T0.timestamp() + 1101) == 0

        # A start under an expired saga's id, even a repeat of its first start, begins a new saga.
        [again] = await store.apply([create("done")])
        assert again.status == "applied"
        assert await store.load_context("done") == saga("done", 1)
        assert await store.list_contexts() == ["done", "running"]

    async def test_no_retention_keeps_ended_sagas(self, stores: Stores) -> None:
        store = stores(retention=None, failed_retention=None)
        await store.apply([create("a"), create("b")])
        await store.apply(
            [
                step("a", 1, "a2", state=WorkflowState.COMPLETED),
                step("b", 1, "b2", state=WorkflowState.FAILED),
            ]
        )
        await stores.pass_time(10 * DEDUPE_TTL_SECONDS)
        assert await store.trim(T0.timestamp() + 10 * DEDUPE_TTL_SECONDS) == 0
        assert sorted(await store.load_contexts(["a", "b"])) == ["a", "b"]
        assert await store.list_contexts() == ["a", "b"]

    async def test_a_repair_that_reopens_an_ended_saga_takes_its_expiry_away(self, stores: Stores) -> None:
        store = stores(retention=100)
        await store.save_context(saga("s", 3, WorkflowState.FAILED))
        await store.save_context(saga("s", 3, WorkflowState.COMPLETED))
        await store.save_context(saga("s", 4, WorkflowState.RUNNING))
        await stores.pass_time(10_000)
        assert await store.trim(T0.timestamp() + 10_000) == 0
        assert await store.load_context("s") == saga("s", 4)
        assert await store.list_contexts("orders", "running") == ["s"]

    @pytest.mark.parametrize("bad", [0, -5, 1.5, True, "7d"])
    async def test_a_bad_retention_is_refused(self, stores: Stores, bad: Any) -> None:
        with pytest.raises(ValidationError, match="retention"):
            stores(retention=bad)
        with pytest.raises(ValidationError, match="failed_retention"):
            stores(failed_retention=bad)

    # ------------------------------------------------------------ partitions

    async def test_the_partition_count_is_recorded_at_first_start_and_another_refused(
        self, store: IStateStore
    ) -> None:
        await store.use_partitions(4)
        await store.use_partitions(4)
        [res] = await store.apply([create("t1")])
        assert res.status == "applied"
        with pytest.raises(ValidationError, match=r"\b4\b.*\b8\b|\b8\b.*\b4\b"):
            await store.use_partitions(8)
        assert await store.load_context("t1") == saga("t1", 1)

    # ------------------------------------------------------------ paged listing

    @staticmethod
    async def _fill(store: IStateStore, n: int, start: int = 0) -> list[SagaContext]:
        """``n`` sagas over two workflows and three states, three to a second, so that pages meet ties."""
        sagas = [
            saga(
                f"s{i:04d}",
                1,
                (WorkflowState.RUNNING, WorkflowState.COMPLETED, WorkflowState.FAILED)[i % 3],
                ("orders", "refunds")[i % 2],
                T0 + timedelta(seconds=i // 3),
            )
            for i in range(start, start + n)
        ]
        for s in sagas:
            await store.save_context(s)
        return sagas

    @staticmethod
    async def _all_pages(store: IStateStore, limit: int, **filters: Any) -> list[str]:
        seen: list[str] = []
        cursor: str | None = None
        for _ in range(1000):
            page, cursor = await store.list_sagas(limit=limit, cursor=cursor, **filters)
            assert len(page) <= limit
            seen += [s["transaction_id"] for s in page]
            if cursor is None:
                return seen
        raise AssertionError("the pages never ended")

    async def test_pages_list_every_saga_once_in_update_order_with_filters(self, store: IStateStore) -> None:
        sagas = await self._fill(store, 200)
        in_order = [s.transaction_id for s in sorted(sagas, key=lambda s: (s.updated_at, s.transaction_id))]
        assert await self._all_pages(store, 7) == in_order
        assert await self._all_pages(store, 1000) == in_order
        assert await self._all_pages(store, 1) == in_order
        by = {s.transaction_id: s for s in sagas}
        for wf, st in (("orders", None), (None, "failed"), ("refunds", "completed"), ("nope", None)):
            want = [
                tx
                for tx in in_order
                if (wf is None or by[tx].workflow_id == wf) and (st is None or by[tx].state == st)
            ]
            assert await self._all_pages(store, 4, workflow_id=wf, state=st) == want, (wf, st)
        page, _ = await store.list_sagas("orders", "running", limit=2)
        assert page == [by["s0000"].to_status(), by["s0006"].to_status()]

    async def test_pages_between_update_times(self, store: IStateStore) -> None:
        sagas = await self._fill(store, 60)
        after, before = T0 + timedelta(seconds=5), T0 + timedelta(seconds=12)
        want = sorted((s.updated_at, s.transaction_id) for s in sagas if after < s.updated_at < before)
        got = await self._all_pages(store, 4, updated_after=after, updated_before=before)
        assert got == [tx for _, tx in want] and len(got) == 18
        assert await self._all_pages(store, 4, updated_after=T0 + timedelta(days=1)) == []

    async def test_pages_stay_stable_while_sagas_are_added(self, store: IStateStore) -> None:
        sagas = await self._fill(store, 90)
        seen: list[str] = []
        cursor: str | None = None
        added = 0
        while True:
            page, cursor = await store.list_sagas(limit=10, cursor=cursor)
            seen += [s["transaction_id"] for s in page]
            if added < 60:
                await self._fill(store, 20, start=1000 + added)  # later updates, listed after the rest
                added += 20
            if cursor is None:
                break
        assert seen[:90] == [
            s.transaction_id for s in sorted(sagas, key=lambda s: (s.updated_at, s.transaction_id))
        ]
        assert sorted(seen[90:]) == [f"s{i:04d}" for i in range(1000, 1060)]
        assert len(set(seen)) == len(seen) == 150

    async def test_an_unknown_state_or_a_malformed_cursor_is_named_in_the_error(
        self, store: IStateStore
    ) -> None:
        await self._fill(store, 5)
        with pytest.raises(ValidationError, match="unknown state 'finished'"):
            await store.list_sagas(state="finished")
        for bad in ("garbage!", "bm90IGEgY3Vyc29y", "", "OnR4"):
            with pytest.raises(ValidationError, match=f"malformed cursor {bad!r}"):
                await store.list_sagas(cursor=bad)
        for limit in (0, -1, 10_001):
            with pytest.raises(ValidationError, match="limit"):
                await store.list_sagas(limit=limit)
        with pytest.raises(ValidationError, match="time zone"):
            await store.list_sagas(updated_after=datetime(2025, 1, 1))

    # ------------------------------------------------------------ lifecycle

    async def test_close_is_idempotent_and_final(self, store: IStateStore) -> None:
        await store.apply([create("t1", outbox=(msg(1),), timers=(timer("t1", "tm", 1.0),))])
        await store.close()
        await store.close()
        for call in every_method(store):
            with pytest.raises(StateStoreError, match="closed"):
                await call()

    async def test_async_with_closes_the_store_on_exit(self, stores: Stores) -> None:
        async with stores() as store:
            [res] = await store.apply([create("t1")])
            assert res.status == "applied"
            assert await store.load_context("t1") == saga("t1", 1)
        with pytest.raises(StateStoreError, match="closed"):
            await store.load_context("t1")


class MemoryStores:
    """In-memory stores on one fake clock, which ``pass_time`` moves on."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self, *, dedupe_ttl: int = DEDUPE_TTL_SECONDS, **retention: int | None) -> IStateStore:
        return InMemoryStateStore(dedupe_ttl=dedupe_ttl, clock=lambda: self.now, **retention)

    async def pass_time(self, seconds: float) -> None:
        self.now += seconds


class TestInMemoryStateStore(StateStoreContract):
    @pytest.fixture
    def stores(self) -> Stores:
        return MemoryStores()


@pytest.mark.redis
class TestRedisStateStore(StateStoreContract):
    @pytest.fixture
    async def stores(self, redis_stores: RedisStores) -> AsyncIterator[Stores]:
        yield redis_stores


@pytest.mark.redis
@pytest.mark.cluster
class TestRedisClusterStateStore(StateStoreContract):
    """The same contract on a Redis Cluster (three primaries with a replica each): the store finds
    out it is one, and waits for a replica after each write (min_replicas 1 by default there)."""

    @pytest.fixture
    async def stores(self, cluster_stores: RedisStores) -> AsyncIterator[Stores]:
        yield cluster_stores
