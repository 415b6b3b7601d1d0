"""A watch of one topic (:meth:`KafkaEventBus.watch`): every message published from now on, read by a
consumer outside any group, so each process that watches sees all of them (the saga waiters use it on
the audit topic)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from ...errors import EventBusError
from ...ports import Watch, WatchHandler
from ...values import InboundMessage
from .aiokafka_workarounds import stop_consumer

__all__ = ["KafkaWatch"]

# How long a fetch waits for new messages: also how soon a stop is noticed.
_POLL_MS = 200


class KafkaWatch(Watch):
    """Reads ``topic`` from the end each partition has when :meth:`_start` returns, into ``handler``."""

    def __init__(
        self,
        consumer: Any,
        topic: str,
        handler: WatchHandler,
        *,
        limit: float,
        servers: str,
        on_stopped: Callable[[KafkaWatch], None],
    ) -> None:
        self._consumer = consumer
        self._topic = topic
        self._handler = handler
        self._limit = limit
        self._servers = servers
        self._on_stopped = on_stopped
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    async def _start(self, admin: Any) -> None:
        """Start the consumer at the end of every partition of the topic, each position resolved, so a
        message published once this returns is read.

        Raises:
            EventBusError: the broker unreachable, or no such topic.
        """
        topic = self._topic
        try:
            async with asyncio.timeout(self._limit):
                [described] = await admin.describe_topics([topic])
                if described["error_code"] != 0 or not described["partitions"]:
                    raise EventBusError(f"no topic {topic!r} on {self._servers}")
                await self._consumer.start()
                partitions = [TopicPartition(topic, p["partition"]) for p in described["partitions"]]
                self._consumer.assign(partitions)
                await self._consumer.seek_to_end(*partitions)
                for tp in partitions:
                    # Resolves the end offset now: seek_to_end alone is lazy, and a message published
                    # before the first fetch would be skipped.
                    await self._consumer.position(tp)
        except (KafkaError, OSError, TimeoutError) as exc:
            await stop_consumer(self._consumer, self._limit)
            raise EventBusError(f"cannot watch {topic!r} on {self._servers}: {exc!r}") from exc
        except BaseException:
            await stop_consumer(self._consumer, self._limit)
            raise
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"kafka-watch:{topic}")

    async def _run(self) -> None:
        try:
            while not self._stopping:
                records = await self._consumer.getmany(timeout_ms=_POLL_MS)
                batch = [
                    InboundMessage(r.topic, r.partition, r.offset, r.key, r.value, tuple(r.headers))
                    for recs in records.values()
                    for r in recs
                ]
                if batch:
                    self._handler(batch)
        except (KafkaError, OSError) as exc:
            raise EventBusError(f"watching {self._topic!r} on {self._servers} failed: {exc!r}") from exc
        finally:
            await stop_consumer(self._consumer, self._limit)
            self._on_stopped(self)

    async def stop(self) -> None:
        """Stop reading, within one fetch's wait; idempotent."""
        self._stopping = True
        if self._task is not None:
            await asyncio.wait({self._task})

    async def ended(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)
