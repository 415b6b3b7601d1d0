"""The end-to-end behaviour tests (tests/e2e/test_behaviour.py) on the whole cluster: the orchestrator and
workers on the three-broker Kafka, the saga state on the Redis Cluster (its writes waiting for a replica
each, min_replicas auto = 1). The same tests, collected here with the ``backend`` fixture overridden."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from ..conftest import Backend, RedisStores, unique
from ..e2e.test_behaviour import *  # noqa: F403 - every behaviour test, run on this module's backend

pytestmark = [pytest.mark.cluster, pytest.mark.kafka, pytest.mark.redis]


@pytest.fixture
async def backend(cluster_kafka: str, cluster_redis: str) -> AsyncIterator[Backend]:
    """Buses on the three brokers and a store on the Redis Cluster, under prefixes of their own."""
    from orchestrator_kafka import KafkaEventBus

    topic_prefix = unique("t")
    stores = RedisStores(cluster_redis, cluster=True)
    made = Backend(
        "cluster",
        lambda: KafkaEventBus(cluster_kafka, topic_prefix=topic_prefix, partitions=2),
        stores(partitions=None),
    )
    made.cleanup.append(stores.close)
    try:
        yield made
    finally:
        await made.close()
