"""The operator read: every message kept on a topic, by a consumer outside any group (for
:meth:`KafkaEventBus.read`: ``tail`` and audits in the CLI)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from ...errors import EventBusError
from ...values import InboundMessage
from .aiokafka_workarounds import stop_consumer

__all__ = ["read_topic"]


async def read_topic(
    consumer: Any, admin: Any, topic: str, *, follow: bool, limit: float, servers: str
) -> AsyncGenerator[InboundMessage, None]:
    """Every message kept on ``topic``, from the earliest offset of each partition, read with
    ``consumer`` (not started, in no group; stopped at the end) after ``admin`` described the topic; with
    ``follow``, then new messages as they arrive. Without it, the read ends at the end offsets the
    partitions had when it began. ``limit`` bounds starting and stopping the consumer (seconds); ``servers``
    names the brokers in errors.

    Raises:
        EventBusError: the broker unreachable, or no such topic.
    """
    try:
        try:
            async with asyncio.timeout(limit):
                [described] = await admin.describe_topics([topic])
                await consumer.start()
        except (KafkaError, OSError, TimeoutError) as exc:
            raise EventBusError(f"cannot read {topic!r} from {servers}: {exc!r}") from exc
        if described["error_code"] != 0 or not described["partitions"]:
            raise EventBusError(f"no topic {topic!r} on {servers}")
        try:
            numbers = sorted(p["partition"] for p in described["partitions"])
            partitions = [TopicPartition(topic, p) for p in numbers]
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            ends: dict[Any, int] = {}
            if not follow:
                begins = await consumer.beginning_offsets(partitions)
                ends = await consumer.end_offsets(partitions)
                ends = {tp: end for tp, end in ends.items() if end > begins[tp]}  # the non-empty ones
            while follow or ends:
                records = await consumer.getmany(*partitions, timeout_ms=500)
                for tp, recs in records.items():
                    end = ends.get(tp)
                    for r in recs:
                        if not follow and (end is None or r.offset >= end):
                            break
                        headers = tuple(r.headers)
                        yield InboundMessage(r.topic, r.partition, r.offset, r.key, r.value, headers)
                    if end is not None and recs and recs[-1].offset >= end - 1:
                        del ends[tp]
        except (KafkaError, OSError) as exc:
            raise EventBusError(f"reading {topic!r} from {servers} failed: {exc!r}") from exc
    finally:
        await stop_consumer(consumer, limit)
