"""Sagas on the whole cluster (three brokers and the Redis Cluster of ``scripts/services up --cluster``):
several orchestrator processes sharing the load, and under load a Redis primary SIGKILLed (its replica
promoted), a Kafka broker SIGKILLed and restarted, and an orchestrator killed -9. After each,
World.verify checks the promise: every saga ends in its state, each transition was applied once (the
audit against the versions in Redis), and each command ran in a handler once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment
from redis.asyncio.cluster import RedisCluster

from orchestrator_kafka.constants import ORCHESTRATOR_GROUP

from ..conftest import require_redis
from ..reliability.harness import World
from ..reliability.test_crash import cancel_holds, mix
from .conftest import CLUSTER_REDIS, services

pytestmark = [pytest.mark.cluster, pytest.mark.kafka, pytest.mark.redis, pytest.mark.reliability]

PARTITIONS = 6  # so that two and three orchestrators each get a share


@pytest.fixture
async def world(cluster_kafka: str, cluster_redis: str, tmp_path: Path) -> AsyncIterator[World]:
    """Processes on the three brokers with the saga state on the Redis Cluster; the handlers record
    their runs on the single Redis, which no fault here touches."""
    made = World(
        cluster_kafka, cluster_redis, require_redis(), tmp_path, partitions=PARTITIONS, redis_cluster=True
    )
    try:
        yield made
    finally:
        await made.close()


async def shares(world: World) -> list[int]:
    """How many partitions each member of the orchestrators' consumer group holds."""
    admin = AIOKafkaAdminClient(bootstrap_servers=world.bootstrap)
    await admin.start()
    try:
        (described,) = await admin.describe_consumer_groups([f"{world.prefix}.{ORCHESTRATOR_GROUP}"])
        (group,) = described.groups
        members = group[5]  # (error, group, state, protocol type, protocol, members, ...)
        counts = []
        for member in members:
            assignment = ConsumerProtocolMemberAssignment.decode(member[-1])
            counts.append(sum(len(partitions) for _, partitions in assignment.assignment))
        return counts
    finally:
        await admin.close()


@pytest.mark.timeout(420)
@pytest.mark.parametrize("orchestrators", [2, 3])
async def test_several_orchestrators_share_the_partitions_and_every_saga_ends_once(
    world: World, orchestrators: int
) -> None:
    await world.up(orchestrators=orchestrators, workers=2)
    ids = await world.submit(mix(150))
    await cancel_holds(world, ids)
    report = await world.verify(ids)
    assert sum(report.states.values()) == 150
    # The start and results topics' partitions (2 x 6), split evenly by the range assignor.
    held = await shares(world)
    assert len(held) == orchestrators and sum(held) == 2 * PARTITIONS, held
    assert max(held) - min(held) <= 2, held


async def primary_of(world: World) -> int:
    """The port of the Redis Cluster primary that holds partition 0's saga keys (every key of a
    partition is in its hash tag's slot)."""
    client = RedisCluster.from_url(CLUSTER_REDIS)
    try:
        await client.initialize()
        return int(client.get_node_from_key(world.store.keys.tagged(0) + ":x").port)
    finally:
        await client.aclose()


async def promoted(port: int, timeout: float = 60) -> None:
    """Until the cluster is whole again without the node on ``port`` (its replica took over)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        client = aioredis.from_url(CLUSTER_REDIS if port != 7000 else "redis://127.0.0.1:7001")
        try:
            info = (await client.execute_command("CLUSTER", "INFO")).decode()
        except Exception:  # noqa: BLE001 - the node asked may be the one down
            info = ""
        finally:
            await client.aclose()
        if "cluster_state:ok" in info:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"the Redis Cluster did not recover from losing {port} in {timeout}s")


@pytest.mark.timeout(420)
async def test_a_redis_primary_killed_under_load_loses_and_repeats_nothing(
    world: World, whole_cluster_after: None
) -> None:
    """SIGKILL a Redis primary while two orchestrators run sagas: its replica is promoted, the writes of
    its slots fail until then and are retried (nothing is committed or published before a write and
    its WAIT succeed), the killed node comes back as a replica, and every saga ends with each transition
    applied once."""
    await world.up(orchestrators=2, workers=1)
    ids = await world.submit(mix(200))
    await world.wait_progress(ids, at_least=40)
    victim = await primary_of(world)
    await asyncio.to_thread(services, "kill", f"redis-{victim}")
    more = await world.submit(mix(40))
    await promoted(victim)
    # Back as a replica of the promoted node: the new primary has a replica again, so writes that wait
    # for one (min_replicas 1) go on.
    await asyncio.to_thread(services, "up", "redis")
    await cancel_holds(world, [*ids, *more])
    report = await world.verify([*ids, *more])
    assert sum(report.states.values()) == 240
    assert all(p.alive() for p in world.procs), world.tails()


@pytest.mark.timeout(420)
async def test_an_orchestrator_killed_9_under_load_is_taken_over(world: World) -> None:
    """Two orchestrators; one is killed -9 in the middle of the load. The other takes its partitions
    (and its outboxes and timers) over, a new one joins, and every saga ends, each transition once."""
    doomed, survivor, *_ = await world.up(orchestrators=2, workers=1)
    ids = await world.submit(mix(200))
    await world.wait_progress(ids, at_least=60)
    doomed.kill9()
    more = await world.submit(mix(40))
    await world.wait_progress(more, at_least=20)
    await world.up(orchestrators=1, workers=0)
    await cancel_holds(world, [*ids, *more])
    report = await world.verify([*ids, *more])
    assert sum(report.states.values()) == 240
    assert survivor.alive(), world.tails()


async def leader_of(bootstrap: str, topic: str) -> int:
    """The broker port that leads partition 0 of ``topic``."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
        leader = next(p["leader"] for p in described["partitions"] if p["partition"] == 0)
        cluster: Any = await admin.describe_cluster()
        return int(next(b["port"] for b in cluster["brokers"] if b["node_id"] == leader))
    finally:
        await admin.close()


@pytest.mark.timeout(420)
async def test_a_broker_killed_under_load_loses_and_repeats_no_transition(
    world: World, whole_cluster_after: None
) -> None:
    """SIGKILL the broker leading the results' partition 0 while two orchestrators run sagas, start
    more while it is down (two of three replicas in sync suffice for acks=all), bring it back: every
    saga ends, and each transition was applied once (World.verify reads the audit topic against the
    saga versions)."""
    await world.up(orchestrators=2, workers=1)
    ids = await world.submit(mix(200))
    await world.wait_progress(ids, at_least=40)
    victim = await leader_of(world.bootstrap, f"{world.prefix}.results")
    await asyncio.to_thread(services, "kill", f"kafka-{victim}")
    more = await world.submit(mix(50))  # published with one broker of three down
    await world.wait_progress(more, at_least=10)
    await asyncio.to_thread(services, "up", "kafka")
    await cancel_holds(world, [*ids, *more])
    report = await world.verify([*ids, *more])
    assert sum(report.states.values()) == 250
    assert all(p.alive() for p in world.procs), world.tails()
