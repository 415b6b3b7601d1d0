"""The Kafka bus under pressure and broker trouble, on its own (no orchestrator)."""

from __future__ import annotations

import asyncio

import pytest

from orchestrator_kafka import KafkaEventBus
from orchestrator_kafka.ports import OutboxMessage

from ..conftest import require_kafka, unique

pytestmark = [pytest.mark.reliability, pytest.mark.kafka]


async def test_a_thousand_concurrent_single_message_publishes_all_succeed() -> None:
    """Regression: aiokafka's add_batch takes the total time waited off its timeout at every wake-up, so
    a few hundred publish calls at once on one partition (a service starting a saga per request) failed
    with KafkaTimeoutError. The bus now hands batches to the producer one caller at a time per
    partition."""
    prefix = unique("rel")
    bus = KafkaEventBus(require_kafka(), topic_prefix=prefix, partitions=1)
    await bus.start()
    topic = f"{prefix}.burst"
    try:
        await bus.ensure_topics([topic])
        await asyncio.gather(
            *(bus.publish([OutboxMessage(topic, f"k{i}", str(i).encode())]) for i in range(1000))
        )
        got = sorted([int(m.value or b"-1") async for m in bus.read(topic)])
        assert got == list(range(1000))
    finally:
        await bus._admin.delete_topics([topic])
        await bus.stop()
