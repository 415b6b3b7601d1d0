"""The Kafka backend on three brokers (``scripts/services up --cluster``), with the single-node Redis: the
event-bus contract, the topics' replication, and sagas end to end.

The Redis Cluster store's contract is in tests/contract; sagas on the whole cluster, and the faults, in
test_cluster_faults.py and test_behaviour_on_cluster.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from orchestrator_kafka import KafkaEventBus
from orchestrator_kafka.ports import IEventBus

from ..conftest import require_redis, unique
from ..contract import test_event_bus as contract
from ..reliability.harness import World
from ..reliability.test_crash import cancel_holds, mix
from .conftest import BROKERS

pytestmark = [pytest.mark.cluster, pytest.mark.kafka]


class TestClusterKafkaEventBus(contract.TestKafkaEventBus):
    """Every event-bus contract test (and the Kafka bus's own) on the three brokers."""

    @pytest.fixture
    async def make_bus(self, cluster_kafka: str) -> AsyncIterator[contract.BusFactory]:
        made: list[IEventBus] = []

        def make() -> IEventBus:
            bus = KafkaEventBus(cluster_kafka, topic_prefix=unique("c"), partitions=4)
            made.append(bus)
            return bus

        yield make
        for bus in made:
            await bus.stop()


# ---------------------------------------------------------------- replication


async def layout(bootstrap: str, topics: list[str]) -> dict[str, tuple[set[int], str]]:
    """Each topic's replica counts (over its partitions) and its min.insync.replicas."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(topics)
        replicas = {t["topic"]: {len(p["replicas"]) for p in t["partitions"]} for t in described}
        answers = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, t, {"min.insync.replicas": None}) for t in topics]
        )
        insync: dict[str, str] = {}
        for answer in answers:
            # (error_code, error_message, resource_type, resource_name, [(name, value, ...), ...])
            for resource in answer.resources:
                entries = {entry[0]: entry[1] for entry in resource[4]}
                insync[resource[3]] = entries["min.insync.replicas"]
        return {t: (replicas[t], insync[t]) for t in topics}
    finally:
        await admin.close()


async def test_topics_get_three_replicas_and_two_in_sync_by_default(cluster_kafka: str) -> None:
    assert BROKERS == 3
    default = KafkaEventBus(cluster_kafka, topic_prefix=unique("c"), partitions=4)
    single = KafkaEventBus(cluster_kafka, topic_prefix=unique("c"), partitions=4, replication_factor=1)
    try:
        await default.start()
        await single.start()
        replicated, unreplicated = unique("topic"), unique("topic")
        await default.ensure_topics([replicated])
        await single.ensure_topics([unreplicated])
        got = await layout(cluster_kafka, [replicated, unreplicated])
    finally:
        await default.stop()
        await single.stop()
    assert got[replicated] == ({3}, "2")
    assert got[unreplicated] == ({1}, "1")  # the brokers' default: 2 of 1 would refuse every write


# ---------------------------------------------------------------- sagas


@pytest.fixture
async def world(cluster_kafka: str, tmp_path: Path) -> AsyncIterator[World]:
    """Orchestrator and worker processes on the three brokers, the saga state on the single Redis."""
    redis_url = require_redis()
    made = World(cluster_kafka, redis_url, redis_url, tmp_path)
    try:
        yield made
    finally:
        await made.close()


async def world_topics(world: World) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=world.bootstrap)
    await admin.start()
    try:
        return sorted(t for t in await admin.list_topics() if t.startswith(f"{world.prefix}."))
    finally:
        await admin.close()


@pytest.mark.redis
@pytest.mark.timeout(300)
async def test_sagas_run_end_to_end_on_three_brokers(world: World) -> None:
    await world.up(orchestrators=1, workers=1)
    ids = await world.submit(mix(60))
    await cancel_holds(world, ids)
    report = await world.verify(ids)
    assert sum(report.states.values()) == 60 and report.states.get("completed", 0) >= 30
    topics = await world_topics(world)
    assert {f"{world.prefix}.results", f"{world.prefix}.events", f"{world.prefix}.start"} <= set(topics)
    # Every topic the orchestrator, the workers and the client made: three copies, two in sync.
    got = await layout(world.bootstrap, topics)
    assert all(replicas == ({3}, "2") for replicas in got.values()), got
