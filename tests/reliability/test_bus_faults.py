"""The Kafka bus under pressure and broker trouble, on its own (no orchestrator)."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.errors import OutOfOrderSequenceNumber

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


async def test_a_producer_killed_by_out_of_order_sequence_is_replaced() -> None:
    """Regression (aio-libs/aiokafka#1017): after OutOfOrderSequenceNumber the idempotent producer's
    sender task ends and every later send raises it again, so the orchestrator could never publish
    again. The bus now notices the dead producer and starts a new one. The death is staged exactly as
    aiokafka's sender does it: its task ends with the error and fails every pending batch."""
    prefix = unique("rel")
    bus = KafkaEventBus(require_kafka(), topic_prefix=prefix, partitions=1)
    await bus.start()
    topic = f"{prefix}.seq"
    try:
        await bus.ensure_topics([topic])
        await bus.publish([OutboxMessage(topic, "k", b"0")])
        old = bus._producer
        sender = old._sender
        sender.sender_task.cancel()
        await asyncio.gather(sender.sender_task, return_exceptions=True)

        async def die() -> None:
            raise OutOfOrderSequenceNumber()

        task = asyncio.ensure_future(die())
        await asyncio.gather(task, return_exceptions=True)
        sender._sender_task = task
        old._message_accumulator.fail_all(OutOfOrderSequenceNumber())

        await bus.publish([OutboxMessage(topic, "k", b"1")])
        assert bus._producer is not old
        await bus.publish([OutboxMessage(topic, "k", b"2")])
        got = [m.value async for m in bus.read(topic)]
        assert got == [b"0", b"1", b"2"]
    finally:
        await bus._admin.delete_topics([topic])
        await bus.stop()
