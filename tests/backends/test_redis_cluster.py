"""RedisStateStore on a Redis Cluster (issue 14, items 1 and 2): cluster detection, start-up nodes, one
script call per slot group, WAIT for replicas, and a failover under writes.

The contract tests run on the cluster too (tests/contract/test_state_store.py). The tests here that
stop or kill nodes run on a private cluster only (``faulty_cluster``), and leave it healthy.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, cast

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.cluster import key_slot

from orchestrator_kafka import NotReplicatedError, RedisStateStore, StateStoreError
from orchestrator_kafka.backends.redis import replication
from orchestrator_kafka.backends.redis.partitions import partition_of
from orchestrator_kafka.ports import TransitionWrite

from ..conftest import RedisStores
from ..contract.test_state_store import create, msg, saga
from ..private_redis import private_redis
from ..redis_cluster import Cluster

pytestmark = [pytest.mark.redis, pytest.mark.cluster]


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _cmd(client: Any, *args: Any, **options: Any) -> Any:
    return await cast("Callable[..., Awaitable[Any]]", client.execute_command)(*args, **options)


def _in(partition: int, count: int = 4, n: int = 1, prefix: str = "tx") -> list[str]:
    """``n`` transaction ids whose saga lives in ``partition`` (of ``count``)."""
    found: list[str] = []
    i = 0
    while len(found) < n:
        tx = f"{prefix}-{i}"
        if partition_of(tx, count) == partition:
            found.append(tx)
        i += 1
    return found


@pytest.fixture
async def store(cluster_stores: RedisStores) -> AsyncIterator[RedisStateStore]:
    made = cluster_stores()
    yield made


# ---------------------------------------------------------------- finding the cluster


async def test_the_store_finds_out_it_is_on_a_cluster_and_waits_for_one_replica(
    store: RedisStateStore,
) -> None:
    assert store.cluster is None and store.min_replicas is None  # not asked yet
    await store.apply([create("t1", outbox=(msg(1),))])
    assert store.cluster is True
    assert store.min_replicas == 1  # every primary has a replica
    assert await store.load_context("t1") is not None
    await store.check()  # every node is asked for its maxmemory-policy: all noeviction


async def test_one_server_without_replicas_waits_for_none() -> None:
    with private_redis() as url:
        store = RedisStateStore(url, partitions=4)
        try:
            await store.apply([create("t1")])
            assert store.cluster is False
            assert store.min_replicas == 0
        finally:
            await store.close()


async def test_cluster_true_needs_no_asking_and_a_cluster_url_list_or_startup_nodes_may_name_a_dead_node(
    redis_cluster: Cluster, cluster_stores: RedisStores
) -> None:
    dead = f"127.0.0.1:{_unused_port()}"
    # The first start-up node is down: the next one is asked, as a URL list, and as startup_nodes.
    listed = cluster_stores(url=f"redis://{dead},{redis_cluster.url}")
    nodes = cluster_stores(url=f"redis://{dead}/0", startup_nodes=[redis_cluster.url])
    told = cluster_stores(url=f"redis://{dead},{redis_cluster.url}", cluster=True)
    for made in (listed, nodes, told):
        await made.save_context(saga("t-startup", 1))
        assert made.cluster is True
        assert await made.load_context("t-startup") is not None


async def test_no_start_up_node_answering_is_a_store_error() -> None:
    store = RedisStateStore(f"redis://127.0.0.1:{_unused_port()},127.0.0.1:{_unused_port()}", partitions=4)
    with pytest.raises(StateStoreError, match="no start-up node answered"):
        await store.load_context("t1")
    await store.close()


# ---------------------------------------------------------------- slots


async def test_a_batch_is_one_script_call_per_partition_and_each_call_one_slot(
    store: RedisStateStore, redis_cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[tuple[str, Sequence[Any]]] = []
    real = replication.Replicas._on_one_connection

    async def counting(self: replication.Replicas, slot_key: str, commands: Sequence[Any]) -> list[Any]:
        sent.extend((slot_key, c) for c in commands)
        return await real(self, slot_key, commands)

    monkeypatch.setattr(replication.Replicas, "_on_one_connection", counting)
    one = _in(2, n=20, prefix="one")
    await store.apply([create(tx, outbox=(msg(i),)) for i, tx in enumerate(one)])
    evals = [c for _, c in sent if c[0] == "EVALSHA"]
    waits = [c for _, c in sent if c[0] == "WAIT"]
    assert len(evals) == 1 and len(waits) == 1  # 20 writes of one partition: one call, one WAIT
    sent.clear()
    spread = [tx for p in (0, 1, 3) for tx in _in(p, n=5, prefix=f"spread{p}")]
    await store.apply([create(tx) for tx in spread])
    assert len([c for _, c in sent if c[0] == "EVALSHA"]) == 3  # one per partition
    sent.clear()
    # A batch again, redelivered: all duplicates, so a barrier write goes before the WAIT.
    results = await store.apply([create(tx) for tx in spread])
    assert {r.status for r in results} == {"duplicate"}
    assert sorted(str(c[0]) for _, c in sent) == ["EVALSHA"] * 3 + ["SET"] * 3 + ["WAIT"] * 6
    # Every key the store wrote is in the slot of its partition's tag.
    raw = RedisCluster.from_url(redis_cluster.url)
    try:
        keys = [k.decode() async for k in raw.scan_iter(match=f"{store.key_prefix}:*", count=1000)]
    finally:
        await raw.aclose()
    assert keys
    for key in keys:
        if key == store.keys.partitions:
            continue
        tag = key[key.index("{") : key.index("}") + 1]
        assert key_slot(key.encode()) == key_slot(tag.encode()), key


# ---------------------------------------------------------------- WAIT


async def _replica_get(cluster: Cluster, key: str) -> Any:
    """``key`` as the replica of the primary that holds it sees it, at once (READONLY on the replica)."""
    raw = RedisCluster.from_url(cluster.url)
    try:
        await raw.initialize()
        primary = raw.get_node_from_key(key)
        assert primary is not None
        replicas = cluster.replicas_of(int(primary.port))
        assert replicas, f"{primary.name} has no replica in sync"
    finally:
        await raw.aclose()
    replica = aioredis.Redis(host="127.0.0.1", port=replicas[0])
    try:
        await _cmd(replica, "READONLY")
        return await _cmd(replica, "GET", key)
    finally:
        await replica.aclose()


def _replica_of_partition(cluster: Cluster, store: RedisStateStore, partition: int) -> int:
    from redis.cluster import RedisCluster as SyncCluster

    sync = SyncCluster.from_url(cluster.url)
    try:
        primary = sync.get_node_from_key(store.keys.outboxes(partition))
        assert primary is not None
        return cluster.replicas_of(int(primary.port))[0]
    finally:
        sync.close()


async def test_with_min_replicas_1_a_write_returns_once_a_replica_has_it(
    faulty_cluster: Cluster,
) -> None:
    stores = RedisStores(faulty_cluster.url, cluster=True)
    store = stores(min_replicas=1)
    try:
        txs = _in(1, n=5)
        await store.apply([create(tx) for tx in txs])
        for tx in txs:  # no sleep: WAIT returned only once the replica had it
            assert await _replica_get(faulty_cluster, store.keys.saga(1, tx)) is not None
    finally:
        await stores.close()


async def test_a_stopped_replica_fails_the_write_until_it_is_back(faulty_cluster: Cluster) -> None:
    stores = RedisStores(faulty_cluster.url, cluster=True)
    store = stores(min_replicas=1, wait_timeout=0.3)
    try:
        await store.apply([create("warm-up")])
        [tx] = _in(3, n=1, prefix="stopped")
        replica = _replica_of_partition(faulty_cluster, store, 3)
        faulty_cluster.pause(replica)
        try:
            started = time.monotonic()
            with pytest.raises(NotReplicatedError, match="acknowledged by 0 of the 1 replicas"):
                await store.apply([create(tx, outbox=(msg(1),))])
            assert time.monotonic() - started < 3
            # Retried (as the orchestrator does), the write is a duplicate: it fails all the same, never
            # passes silently, since its outbox would be published off a write no replica has.
            with pytest.raises(NotReplicatedError):
                await store.apply([create(tx, outbox=(msg(1),))])
        finally:
            faulty_cluster.resume(replica)
        deadline = time.monotonic() + 10
        while True:
            try:
                [result] = await store.apply([create(tx, outbox=(msg(1),))])
                break
            except NotReplicatedError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        assert result.status == "duplicate" and result.outbox == (msg(1),)
        assert await _replica_get(faulty_cluster, store.keys.saga(3, tx)) is not None
    finally:
        await stores.close()
        faulty_cluster.wait_healthy()


# ---------------------------------------------------------------- failover


async def test_a_primary_killed_under_writes_loses_no_acknowledged_write(faulty_cluster: Cluster) -> None:
    """SIGKILL the primary of a partition while writes go on: its replica is promoted, the writes that
    failed meanwhile are retried (as the orchestrator retries a batch), and every write the store
    acknowledged is there afterwards. The killed node is started again and rejoins as a replica, so
    that writes can have their replica again (min_replicas 1)."""
    stores = RedisStores(faulty_cluster.url, cluster=True)
    store = stores(min_replicas=1, wait_timeout=0.5)
    acknowledged: list[str] = []
    failures: list[str] = []
    stop = asyncio.Event()

    async def writer() -> None:
        n = 0
        while not stop.is_set():
            batch: list[TransitionWrite] = [create(f"fo-{n}-{k}") for k in range(8)]
            while True:
                try:
                    results = await store.apply(batch)
                    break
                except StateStoreError as exc:
                    failures.append(type(exc).__name__)
                    await asyncio.sleep(0.1)
            assert {r.status for r in results} <= {"applied", "duplicate"}
            acknowledged.extend(w.transaction_id for w in batch)
            n += 1

    try:
        await store.apply([create("warm-up")])
        raw = RedisCluster.from_url(faulty_cluster.url)
        try:
            await raw.initialize()
            node = raw.get_node_from_key(store.keys.outboxes(0))
            assert node is not None
            victim = int(node.port)
        finally:
            await raw.aclose()
        [replica] = faulty_cluster.replicas_of(victim)
        task = asyncio.get_running_loop().create_task(writer())
        await asyncio.sleep(0.5)
        before = len(acknowledged)
        assert before > 0
        faulty_cluster.kill(victim)
        # The replica takes over after cluster-node-timeout (2 s); until then writes to its slots fail.
        deadline = time.monotonic() + 20
        while faulty_cluster.role(replica) != "master":
            assert time.monotonic() < deadline, "no replica was promoted"
            await asyncio.sleep(0.2)
        faulty_cluster.restart(victim)  # rejoins as the new primary's replica
        deadline = time.monotonic() + 30
        after = len(acknowledged)
        while len(acknowledged) < after + 80:
            assert time.monotonic() < deadline, f"writes did not resume: {failures[-5:]}"
            assert not task.done(), task.exception()
            await asyncio.sleep(0.2)
        stop.set()
        await task
        assert failures, "the kill should have failed some writes"
        found = await store.load_contexts(acknowledged)
        lost = [tx for tx in acknowledged if tx not in found]
        assert not lost, f"{len(lost)} acknowledged writes lost, e.g. {lost[:5]}"
    finally:
        stop.set()
        await stores.close()
        faulty_cluster.wait_healthy()
