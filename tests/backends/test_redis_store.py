"""RedisStateStore on a real Redis (``REDIS_URL``, default redis://127.0.0.1:6379/0): what only the
Redis store has (its keys, TTLs, script loading, corrupt entries, clients, racing clients, client CPU).
What every state store does is in tests/contract/test_state_store.py, which runs on Redis too.

Each test uses a key prefix of its own and deletes its keys afterwards, so it can share a server.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import pytest
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from orchestrator_kafka.backends.redis import RedisStateStore
from orchestrator_kafka.backends.redis.packing import compact_json, event_digest, load_record
from orchestrator_kafka.backends.redis.partitions import partition_of
from orchestrator_kafka.context import WorkflowState
from orchestrator_kafka.errors import StateStoreError, ValidationError
from orchestrator_kafka.ports import OutboxMessage

from ..conftest import RedisStores
from ..contract.test_state_store import create, msg, saga, step, timer
from .test_redis_store_unit import realistic

pytestmark = pytest.mark.redis


def P(tx: str) -> int:
    """The partition of ``tx`` in the tests' stores (4 partitions)."""
    return partition_of(tx, 4)


async def cmd(client: aioredis.Redis, *args: Any) -> Any:
    """A raw Redis command (redis-py's own method types do not say they are awaitable)."""
    return await cast("Callable[..., Awaitable[Any]]", client.execute_command)(*args)


@pytest.fixture
def store(redis_stores: RedisStores) -> RedisStateStore:
    return redis_stores()


@pytest.fixture
async def raw(redis_stores: RedisStores) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_stores.url)
    try:
        yield client
    finally:
        await client.aclose()


# ---------------------------------------------------------------- keys


async def test_raw_layout(store: RedisStateStore, raw: aioredis.Redis) -> None:
    """Operators can read a saga with plain commands: GET P:{tx} is its record."""
    await store.apply([create("t1", outbox=(msg(1),), timers=(timer("t1", "tm", 5.0),))])
    p = store.key_prefix
    # Every key is a partition's: t1's, as Kafka partitions messages keyed t1 over 4 partitions.
    t = f"{p}:{{p{partition_of('t1', 4)}}}"
    fields, ctx = load_record(await cmd(raw, "GET", f"{t}:s:t1"))
    assert ctx == compact_json(saga("t1", 1))
    assert fields == [b"1", b"running", b"orders", event_digest("t1-create").encode()]
    assert not await cmd(raw, "EXISTS", f"{t}:ev:t1")  # a live saga keeps its events in its record
    assert await cmd(raw, "ZRANGE", f"{t}:o:t1", 0, -1, "WITHSCORES") != []
    assert await cmd(raw, "SMEMBERS", f"{t}:outboxes") == {b"t1"}
    assert await cmd(raw, "ZSCORE", f"{t}:timers", "tm") == 5.0
    assert await cmd(raw, "SMEMBERS", f"{t}:t:t1") == {b"tm"}
    assert await cmd(raw, "ZRANGE", f"{t}:idx:running:orders", 0, -1) == [b"t1"]
    assert await cmd(raw, "SMEMBERS", f"{t}:workflows") == {b"orders"}
    assert await cmd(raw, "GET", f"{p}:partitions") == b"4"


async def _keys_under(raw: aioredis.Redis, prefix: str) -> set[str]:
    return {key.decode() async for key in raw.scan_iter(match=f"{prefix}:*", count=1000)}


async def test_the_script_writes_exactly_the_keys_redis_keys_names(
    store: RedisStateStore, raw: aioredis.Redis
) -> None:
    """The script builds key names itself, from definitions generated from RedisKeys: both agree."""
    k = store.keys
    await store.apply([create("t1", outbox=(msg(1),), timers=(timer("t1", "tm", 5.0),))])
    p1, p2 = partition_of("t1", 4), partition_of("t2", 4)
    saga_keys = {k.saga(p1, "t1"), k.outbox(p1, "t1"), k.saga_timers(p1, "t1")}
    shared = {k.outboxes(p1), k.timers(p1), k.timer_entries(p1), k.workflows(p1), k.partitions}
    indexes = {k.index(p1, "running", "orders")}
    assert await _keys_under(raw, store.key_prefix) == saga_keys | shared | indexes
    await store.save_context(saga("t2", 1, WorkflowState.FAILED, wf="refunds"))
    await store.apply([step("t1", 1, "e2", state=WorkflowState.COMPLETED, cancel_timers=("tm",))])
    assert await _keys_under(raw, store.key_prefix) == (
        {k.saga(p1, "t1"), k.outbox(p1, "t1"), k.saga(p2, "t2"), k.outboxes(p1), k.partitions}
        | {
            k.workflows(p1),
            k.workflows(p2),
            k.index(p1, "completed", "orders"),
            k.index(p2, "failed", "refunds"),
        }
    )
    assert await store.load_contexts(["t1", "t2"]) == {
        "t1": saga("t1", 2, WorkflowState.COMPLETED),
        "t2": saga("t2", 1, WorkflowState.FAILED, wf="refunds"),
    }
    await store.ack_outbox([("t1", 2)])
    assert await store.delete_context("t1") is True
    assert await store.delete_context("t2") is True
    # The deleted saga's recent events stay, until they expire; so does the list of workflows.
    assert await _keys_under(raw, store.key_prefix) == {
        k.events(p1, "t1"),
        k.workflows(p1),
        k.workflows(p2),
        k.partitions,
    }


async def test_an_own_acknowledgement_rides_on_the_next_write_and_the_sweep_drops_the_empty_outbox(
    store: RedisStateStore, raw: aioredis.Redis
) -> None:
    """The orchestrator's acknowledgement of its own entry waits for the partition's next write and goes
    with it; it leaves the saga in the set of outboxes, which the sweep (pending_outboxes) tidies."""
    k, p = store.keys, partition_of("t1", 4)
    await store.apply([create("t1", outbox=(msg(1),))])
    acked = asyncio.ensure_future(store.ack_outbox([("t1", 1)], only=True))
    await asyncio.sleep(0)
    assert not acked.done()  # held for the next write of t1's partition
    await store.apply([step("t1", 1, "e2", outbox=(msg(2),))])
    await asyncio.wait_for(acked, 1.0)  # that write carried it
    assert await cmd(raw, "ZCOUNT", k.outbox(p, "t1"), "-inf", "+inf") == 1  # entry 2 only
    assert [(o.transaction_id, o.outbox_id) for o in await store.pending_outboxes()] == [("t1", 2)]
    await store.ack_outbox([("t1", 2)], only=True)  # no write comes: sent alone
    assert await cmd(raw, "SMEMBERS", k.outboxes(p)) == {b"t1"}
    assert await store.pending_outboxes() == []
    assert await cmd(raw, "SMEMBERS", k.outboxes(p)) == set()


async def test_deleting_a_saga_deletes_its_keys(store: RedisStateStore, raw: aioredis.Redis) -> None:
    await store.apply([create("d1", outbox=(msg(1),), timers=(timer("d1", "dt", 1.0),))])
    assert await store.delete_context("d1") is True
    assert not await cmd(
        raw, "EXISTS", store.keys.outbox(P("d1"), "d1"), store.keys.saga_timers(P("d1"), "d1")
    )
    assert not await cmd(raw, "HEXISTS", store.keys.timer_entries(P("d1")), "dt")


async def test_expiry_of_records_and_tombstones(
    redis_stores: RedisStores, store: RedisStateStore, raw: aioredis.Redis
) -> None:
    short = redis_stores(dedupe_ttl=60, retention=120, failed_retention=3600)
    await short.apply([create("t1", outbox=(msg(1),)), create("t2"), create("t3")])
    assert await short.delete_context("t1") is True
    assert 0 < await raw.ttl(store.keys.events(P("t1"), "t1")) <= 60  # the deleted saga's events
    assert await raw.ttl(store.keys.saga(P("t2"), "t2")) == -1  # an unfinished saga never expires
    await short.apply(
        [
            step("t2", 1, "e2", state=WorkflowState.COMPLETED, outbox=(msg(2),)),
            step("t3", 1, "e3", state=WorkflowState.FAILED),
        ]
    )
    assert 60 < await raw.ttl(store.keys.saga(P("t2"), "t2")) <= 120
    assert 60 < await raw.ttl(store.keys.outbox(P("t2"), "t2")) <= 120  # its other keys go with it
    assert 120 < await raw.ttl(store.keys.saga(P("t3"), "t3")) <= 3600
    # A repair that reopens an ended saga takes its expiry away.
    await short.save_context(saga("t2", 3))
    assert await raw.ttl(store.keys.saga(P("t2"), "t2")) == -1
    assert await raw.ttl(store.keys.outbox(P("t2"), "t2")) == -1
    await short.close()


# ---------------------------------------------------------------- partitions


async def test_every_key_is_its_saga_s_kafka_partition_s(
    redis_stores: RedisStores, store: RedisStateStore, raw: aioredis.Redis
) -> None:
    """One partition's keys share one hash tag, so one Redis Cluster slot: a batch that spans partitions
    is one script call per partition, and each saga's keys are in its Kafka partition's tag."""
    txs = [f"tx-{i}" for i in range(40)]
    await store.apply(
        [create(tx, outbox=(msg(i),), timers=(timer(tx, f"tm-{i}", 5.0),)) for i, tx in enumerate(txs)]
    )
    await store.apply([step(tx, 1, f"{tx}-2", state=WorkflowState.COMPLETED) for tx in txs[:10]])
    await store.delete_context(txs[-1])
    tagged = re.compile(rf"^{re.escape(store.key_prefix)}:\{{p(\d)\}}:(?:(?:s|o|t|ev):(.+)|[a-z]+(?::.*)?)$")
    keys = await _keys_under(raw, store.key_prefix)
    assert store.keys.partitions in keys
    partitions_used = set()
    for key in keys - {store.keys.partitions}:
        match = tagged.match(key)
        assert match, key
        partitions_used.add(int(match[1]))
        if match[2] is not None:
            assert int(match[1]) == partition_of(match[2], 4), key
    assert partitions_used == {0, 1, 2, 3}
    # Everything is found again across the partitions.
    assert len(await store.load_contexts(txs)) == 39
    assert len(await store.list_contexts()) == 39
    assert len(await store.pending_outboxes()) == 39
    assert len(await store.claim_due_timers(10.0, 100, 30.0)) == 39
    page, cursor = await store.list_sagas(state="completed", limit=4)
    assert len(page) == 4 and cursor is not None


async def test_a_client_reads_by_the_recorded_count_and_another_count_is_refused(
    redis_stores: RedisStores, store: RedisStateStore
) -> None:
    client = redis_stores(partitions=None)
    # Nothing recorded yet: nothing exists, and a write has no partition to go to.
    assert await client.load_context("t1") is None and await client.list_contexts() == []
    with pytest.raises(StateStoreError, match="no partition count is recorded"):
        await client.apply([create("t1")])
    await store.apply([create("t1"), create("t2")])
    assert await client.load_context("t1") == saga("t1", 1)
    assert sorted(await client.load_contexts(["t1", "t2"])) == ["t1", "t2"]
    assert await client.list_contexts() == ["t1", "t2"]
    other = redis_stores(partitions=None)
    with pytest.raises(ValidationError, match=r"recorded 4 partitions .* the topics have 8"):
        await other.use_partitions(8)
    with pytest.raises(ValidationError, match="recorded 4 partitions"):
        await redis_stores(partitions=2).load_context("t1")


# ---------------------------------------------------------------- corrupt entries


async def test_corrupt_record_raises_state_store_error(store: RedisStateStore, raw: aioredis.Redis) -> None:
    await store.save_context(saga("t0", 1))  # records the partition count
    await cmd(
        raw, "SET", store.keys.saga(P("bad"), "bad"), b"1:1" + b"7:running" + b"1:w" + b"0:" + b"{not json"
    )
    with pytest.raises(StateStoreError, match="not a valid SagaContext"):
        await store.load_context("bad")
    with pytest.raises(StateStoreError):
        await store.load_contexts(["bad"])


async def test_corrupt_outbox_entry_raises_state_store_error(
    store: RedisStateStore, raw: aioredis.Redis
) -> None:
    await store.apply([create("t1", outbox=(msg(1),))])
    await cmd(raw, "ZADD", store.keys.outbox(P("t1"), "t1"), 0, b"not json")
    with pytest.raises(StateStoreError, match="cannot be decoded"):
        await store.pending_outboxes()
    with pytest.raises(StateStoreError, match="cannot be decoded"):
        await store.apply([create("t1")])
    await store.save_context(saga("t0", 1))  # records the partition count
    for n in range(4):
        await cmd(raw, "HSET", store.keys.timer_entries(n), "bad", b"[1]")
        await cmd(raw, "ZADD", store.keys.timers(n), 0, "bad")
    with pytest.raises(StateStoreError, match="cannot be decoded"):
        await store.claim_due_timers(1.0, 10, 30.0)


# ---------------------------------------------------------------- clients


async def test_script_reloaded_on_noscript(redis_stores: RedisStores) -> None:
    client = aioredis.Redis.from_url(redis_stores.url)
    real = client.execute_command
    calls: list[str] = []

    async def flaky(*args: Any, **kwargs: Any) -> Any:
        calls.append(str(args[0]))
        if args[0] == "EVALSHA" and calls.count("EVALSHA") == 1:
            raise NoScriptError("NOSCRIPT No matching script.")
        return await cast("Callable[..., Awaitable[Any]]", real)(*args, **kwargs)

    client.execute_command = flaky  # type: ignore[method-assign]
    made = redis_stores(client=client)
    try:
        [res] = await made.apply([create("t1")])
        assert res.status == "applied"
        # First use asks for the replicas (INFO) and loads the script; the first write records the
        # partition count (SET NX, GET), then the script, loaded again on NOSCRIPT.
        assert calls == ["INFO", "SCRIPT", "SET", "GET", "EVALSHA", "SCRIPT", "EVALSHA"]
        await made.close()
        # A client passed in stays open.
        assert await cmd(client, "PING")
    finally:
        await client.aclose()


async def test_client_that_decodes_responses(redis_stores: RedisStores) -> None:
    client = aioredis.Redis.from_url(redis_stores.url, decode_responses=True)
    made = redis_stores(client=client)
    try:
        odd = OutboxMessage("t", "k", bytes(range(256)), (("h", b"\xff"),))
        [res] = await made.apply([create("t1", outbox=(odd,), timers=(timer("t1", "tm", 1.0),))])
        assert res.outbox == (odd,)
        [dup] = await made.apply([create("t1")])
        assert dup.outbox == (odd,)
        [pending] = await made.pending_outboxes()
        assert (pending.transaction_id, pending.messages) == ("t1", (odd,))
        assert await made.list_contexts("orders") == ["t1"]
        assert await made.load_context("t1") == saga("t1", 1)
        assert await made.load_contexts(["t1"]) == {"t1": saga("t1", 1)}
        assert await made.claim_due_timers(2.0, 10, 30.0) == [timer("t1", "tm", 1.0)]
    finally:
        await made.close()
        await client.aclose()


async def test_concurrent_batches_stay_consistent(redis_stores: RedisStores, store: RedisStateStore) -> None:
    """Two clients racing on the same sagas: each transition is applied exactly once."""
    other = redis_stores()
    await store.apply([create(f"t{i}") for i in range(50)])
    batch = [step(f"t{i}", 1, f"e{i}") for i in range(50)]
    first, second = await asyncio.gather(store.apply(batch), other.apply(batch))
    for a, b in zip(first, second, strict=True):
        assert sorted([a.status, b.status]) == ["applied", "duplicate"]


# ---------------------------------------------------------------- client CPU


async def _measure(store: RedisStateStore, size: int, rounds: int) -> tuple[float, float, float]:
    """Client CPU per transition for batches of ``size``, in microseconds: the least and the median over
    ``rounds`` apply calls (the least is the cost without interference from other processes), and the
    median wall time."""
    tag = uuid.uuid4().hex[:6]
    txs = [f"bench-{tag}-{i}" for i in range(size)]
    await store.apply([realistic(tx, 0, i) for i, tx in enumerate(txs)])
    cpu: list[float] = []
    wall: list[float] = []
    for r in range(1, rounds + 1):
        writes = [realistic(tx, r, i) for i, tx in enumerate(txs)]
        c0, w0 = time.process_time(), time.perf_counter()
        results = await store.apply(writes)
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
        assert all(res.status == "applied" for res in results)
        await store.ack_outbox([(res.transaction_id, res.outbox_id) for res in results])
    cpu.sort()
    wall.sort()
    return cpu[0] / size * 1e6, cpu[rounds // 2] / size * 1e6, wall[rounds // 2] / size * 1e6


@pytest.mark.parametrize("size", [100, 500])
async def test_client_cpu_per_transition(store: RedisStateStore, size: int) -> None:
    await _measure(store, size, 3)  # warm up: script load, connection, caches
    least, median, wall = await _measure(store, size, 20)
    print(
        f"\nbatch {size}: client CPU per transition {least:.1f} us least, {median:.1f} us median; "
        f"wall {wall:.1f} us median"
    )
    # Generous bound: DESIGN section 7 expects ~11-14 us; this only catches a gross regression.
    assert least < 100


# ---------------------------------------------------------------- idle timer claims


def counting_claims(store: RedisStateStore) -> list[int]:
    """The partitions each of ``store``'s claim script calls went to, as they are made."""
    calls: list[int] = []
    script = store._script

    async def counted(op: str, partition: int, *args: Any) -> Any:
        if op == "claim":
            calls.append(partition)
        return await script(op, partition, *args)

    store._script = counted  # type: ignore[method-assign]
    return calls


async def test_an_idle_store_asks_each_partition_once_a_recheck_interval(
    redis_stores: RedisStores, store: RedisStateStore
) -> None:
    await store.apply([create("t1")])  # the partition count is known
    calls = counting_claims(store)
    assert await store.claim_due_timers(100.0, 10, 30.0) == []
    assert sorted(calls) == [0, 1, 2, 3]
    for now in (100.05, 100.5, 100.95):  # ticks of an idle orchestrator: nothing is due, nothing asked
        assert await store.claim_due_timers(now, 10, 30.0) == []
    assert len(calls) == 4
    assert await store.claim_due_timers(101.0, 10, 30.0) == []  # a second later, asked again
    assert len(calls) == 8


async def test_a_timer_this_store_writes_is_claimed_when_due_without_waiting_for_the_recheck(
    store: RedisStateStore,
) -> None:
    await store.apply([create("t0")])
    assert await store.claim_due_timers(100.0, 10, 30.0) == []
    await store.apply([create("t1", timers=(timer("t1", "tm", 100.2),))])
    assert await store.claim_due_timers(100.1, 10, 30.0) == []
    assert await store.claim_due_timers(100.2, 10, 30.0) == [timer("t1", "tm", 100.2)]


async def test_a_timer_another_store_writes_is_claimed_after_the_recheck_at_most(
    redis_stores: RedisStores, store: RedisStateStore
) -> None:
    other = redis_stores()
    await store.apply([create("t0")])
    assert await store.claim_due_timers(100.0, 10, 30.0) == []
    await other.apply([create("t1", timers=(timer("t1", "tm", 100.2),))])
    assert await store.claim_due_timers(100.5, 10, 30.0) == []  # not known here yet
    assert await store.claim_due_timers(101.0, 10, 30.0) == [timer("t1", "tm", 100.2)]


async def test_a_claim_that_meets_the_limit_asks_again_at_the_next_tick(store: RedisStateStore) -> None:
    await store.apply([create(f"t{i}", timers=(timer(f"t{i}", f"tm{i}", 50.0),)) for i in range(8)])
    got = await store.claim_due_timers(100.0, 3, 30.0)
    assert len(got) == 3
    rest = await store.claim_due_timers(100.05, 10, 30.0)
    assert len(got) + len(rest) == 8
