"""The publisher: how :meth:`KafkaEventBus.publish` turns messages into record batches and hands them over.

``publish`` builds one record batch per (topic, partition) itself (aiokafka's ``create_batch`` /
``send_batch``: ~6 us of CPU a message instead of ~30 with one ``send`` each), choosing partitions exactly
as aiokafka's and the Java client's default partitioner do (murmur2 of the key, cached per key), hands
them to one shared idempotent producer (``acks=all``) and awaits every delivery together; it returns only
once all are acknowledged. A producer that died for good is replaced by a new one.

The producer lingers only under load: while fewer than ``BUSY_MESSAGES`` messages were published in the
last window of ``LOAD_WINDOW`` seconds, it sends each request as soon as the previous one is answered
(what piles up meanwhile goes together in the next request); above that it waits the bus's ``linger_ms``
between requests, for fewer and larger ones. An idle saga's hops then cost no linger each.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner

from ...errors import EventBusError
from ...values import OutboxMessage
from .aiokafka_workarounds import InTurn, producer_is_dead, set_linger, why_producer_died
from .teardown import quietly

__all__ = ["BUSY_MESSAGES", "LOAD_WINDOW", "MAX_BATCH_BYTES", "MAX_REQUEST_BYTES", "Publisher"]

_log = logging.getLogger("orchestrator_kafka.kafka")

# Record batch cap, for the batches publish builds and for aiokafka's own. A 500-message publish of
# 300 B messages fits in one batch per partition; 256 KB stays well under the broker's 1 MB
# message.max.bytes.
MAX_BATCH_BYTES = 256 * 1024
# The largest record the producer accepts, as aiokafka's max_request_size (whose default it is): a
# record batch holding just that record must fit. The broker's own limit (message.max.bytes, 1 MB +
# 12 B by default) is a little larger.
MAX_REQUEST_BYTES = 1024 * 1024
# Bytes a v2 record batch adds around its records (aiokafka's DefaultRecordBatchBuilder.HEADER_STRUCT).
_BATCH_OVERHEAD = 61
# Keys whose partition is remembered, per partition layout: a transaction id repeats over a saga's
# messages and murmur2 in pure Python costs ~20 us a key. Cleared when full (bounded memory): the sagas
# in flight are what need remembering, and 65,536 keys made a process's memory creep up for minutes.
_PARTITION_CACHE_SIZE = 8_192

_PARTITIONER = DefaultPartitioner()

# Load is counted in windows of this many seconds ...
LOAD_WINDOW = 0.1
# ... and a window with at least this many messages published is busy: the next one lingers. 2,000
# messages a second is about 1,000 saga steps a second from the orchestrator (a command and an audit
# record each), where requests come faster than the broker answers them anyway.
BUSY_MESSAGES = 200


class Publisher:
    """The bus's shared producer and everything ``publish`` does with it.

    ``make_producer`` makes a new (not yet started) producer; ``timeout`` bounds starting and stopping
    one; ``lifecycle`` is the bus's start/stop lock, which a producer replacement takes too.
    """

    def __init__(
        self,
        make_producer: Callable[[], Any],
        *,
        timeout: float,
        lifecycle: asyncio.Lock,
        linger: float = 0.0,
    ) -> None:
        self._make_producer = make_producer
        self._linger = linger
        # The load window: when it began and the messages published in it; the producer made to send
        # without lingering (any other, a new one included, lingers as the bus made it).
        self._window_start = 0.0
        self._window_messages = 0
        self._unlingered: Any = None
        self._timeout = timeout
        self._lifecycle = lifecycle
        # The started producer while the bus runs (the bus sets it in start and clears it in stop).
        self.producer: Any = None
        # Partition of each recently published key, per partition layout (see _TopicPlan).
        self._partition_caches: dict[tuple[int, ...], dict[str, int]] = {}
        # Hands batches to the producer one caller at a time per (topic, partition) (see InTurn).
        self._in_turn = InTurn()

    async def publish(self, producer: Any, messages: Sequence[OutboxMessage]) -> None:
        """Publish ``messages`` (not empty, their topics created) through ``producer`` and return once
        every one is acknowledged; see :meth:`KafkaEventBus.publish`."""
        if producer_is_dead(producer):
            producer = await self._replace_producer(producer)
        self._adapt_linger(producer, len(messages))
        plans = await self._build_batches(producer, messages)
        try:
            await self._send_batches(producer, plans, len(messages))
        except EventBusError:
            if producer_is_dead(producer):
                await self._replace_producer(producer)  # for the caller's retry
            raise

    def _adapt_linger(self, producer: Any, count: int) -> None:
        """Count ``count`` messages into the load window; at a window's end, linger while busy only."""
        now = time.monotonic()
        if now - self._window_start >= LOAD_WINDOW:
            busy = self._window_messages >= BUSY_MESSAGES and now - self._window_start < 2 * LOAD_WINDOW
            lingering = producer is not self._unlingered
            if busy and not lingering:
                set_linger(producer, self._linger)
                self._unlingered = None
            elif not busy and lingering:
                set_linger(producer, 0.0)
                self._unlingered = producer
            self._window_start, self._window_messages = now, 0
        self._window_messages += count

    async def _replace_producer(self, dead: Any) -> Any:
        """Swap a dead producer for a new one; the producer to use (the dead one if the new one cannot
        start yet: the next publish tries again).

        aiokafka's idempotent producer dies for good on some errors (OutOfOrderSequenceNumber after a
        rejected batch, aio-libs/aiokafka#1017; see ``aiokafka_workarounds``): only a new producer (a new
        producer id) publishes again.
        """
        async with self._lifecycle:
            if self.producer is not dead:  # replaced meanwhile, or the bus was stopped
                return self.producer if self.producer is not None else dead
            _log.warning("the Kafka producer died (%r); starting a new one", why_producer_died(dead))
            fresh = self._make_producer()
            try:
                async with asyncio.timeout(self._timeout):
                    await fresh.start()
            except (TimeoutError, KafkaError, OSError) as exc:
                _log.warning("could not start a new Kafka producer yet: %r", exc)
                await quietly("new producer stop", fresh.stop(), self._timeout)
                return dead
            self.producer = fresh
            await quietly("dead producer stop", dead.stop(), self._timeout)
            return fresh

    async def _build_batches(self, producer: Any, messages: Sequence[OutboxMessage]) -> dict[str, _TopicPlan]:
        """Append every message to its partition's batches; nothing is sent yet. This loop is the hot
        path: one dict lookup for the topic, one for the key's partition, one C-level append."""
        plans: dict[str, _TopicPlan] = {}
        create_batch = producer.create_batch
        index = 0
        topic = ""
        try:
            for index, m in enumerate(messages):
                topic = m.topic
                plan = plans.get(topic)
                if plan is None:
                    plan = plans[topic] = await self._plan(producer, topic)
                key = m.key
                partition = plan.cache.get(key)
                if partition is None:
                    partition = plan.choose(key)
                key_bytes = key.encode()
                # aiokafka's C batch builder takes headers as a list only.
                headers = list(m.headers)
                batches = plan.batches.get(partition)
                if (
                    batches is None
                    or batches[-1].append(timestamp=None, key=key_bytes, value=m.value, headers=headers)
                    is None
                ):
                    # No batch for this partition yet, or it is full: start another. Its first record
                    # always fits, however large, so the size limit is checked here.
                    batch = create_batch()
                    record = batch.append(timestamp=None, key=key_bytes, value=m.value, headers=headers)
                    size = _BATCH_OVERHEAD + (record.size if record is not None else 0)
                    if record is None or size > MAX_REQUEST_BYTES:
                        raise EventBusError(
                            f"message {index} of {len(messages)} (topic {topic!r}, key {key!r}) is {size:,} "
                            f"bytes as a record batch, over the {MAX_REQUEST_BYTES:,}-byte limit; nothing "
                            "of this call was published"
                        )
                    if batches is None:
                        plan.batches[partition] = [batch]
                    else:
                        batches.append(batch)
        except (ValueError, TypeError) as exc:
            # A value or header value that is not bytes, a header name that is not a str.
            raise EventBusError(
                f"message {index} of {len(messages)} (topic {topic!r}) cannot be encoded: {exc!r}; nothing "
                "of this call was published"
            ) from exc
        return plans

    async def _plan(self, producer: Any, topic: str) -> _TopicPlan:
        """The partitions of ``topic`` from the producer's metadata (fetched if not known yet)."""
        cluster = producer.client.cluster
        partitions = cluster.partitions_for_topic(topic)
        if partitions is None:
            try:
                partitions = await producer.partitions_for(topic)
            except (KafkaError, OSError) as exc:
                raise EventBusError(f"no metadata for topic {topic!r}: {exc!r}") from exc
        all_partitions = tuple(sorted(partitions))
        # The choice depends on the key and the partition list only, so topics with the same layout share
        # one cache: a transaction id is hashed once for all the topics it is published to.
        cache = self._partition_caches.get(all_partitions)
        if cache is None:
            if len(self._partition_caches) >= 16:  # layouts only change when topics are repartitioned
                self._partition_caches.clear()
            cache = self._partition_caches[all_partitions] = {}
        available = sorted(cluster.available_partitions_for_topic(topic) or ())
        return _TopicPlan(all_partitions, available, cache)

    async def _send_batches(self, producer: Any, plans: dict[str, _TopicPlan], total: int) -> None:
        """Hand the batches to the producer and await their deliveries together."""
        # First batches of every partition, then the second ones, ...: a partition's next batch is only
        # accepted once its previous one left for the broker, so this order lets the first batches of
        # every partition share one produce request. A partition's batches go in order.
        queues = [(topic, p, batches) for topic, plan in plans.items() for p, batches in plan.batches.items()]
        rounds = max(len(batches) for _, _, batches in queues)
        futures: list[asyncio.Future[Any]] = []
        sent: list[tuple[str, int]] = []
        for r in range(rounds):
            for topic, partition, batches in queues:
                if r >= len(batches):
                    continue
                batch = batches[r]
                batch.close()  # nothing else may be appended once it is queued
                try:
                    # One caller at a time per partition, first come first served (see InTurn: aiokafka's
                    # add_batch makes concurrent callers time out otherwise).
                    futures.append(await self._in_turn.send_batch(producer, batch, topic, partition))
                except (KafkaError, OSError) as exc:
                    # Retrieve the queued deliveries so none is left with an unobserved exception.
                    await asyncio.gather(*futures, return_exceptions=True)
                    raise EventBusError(
                        f"could not queue a batch of {batch.record_count()} messages for topic {topic!r} "
                        f"partition {partition} ({sum(n for _, n in sent)} of {total} messages were "
                        f"queued): {exc!r}"
                    ) from exc
                sent.append((topic, batch.record_count()))
        results = await asyncio.gather(*futures, return_exceptions=True)
        failed = [(where, r) for where, r in zip(sent, results, strict=True) if isinstance(r, BaseException)]
        if failed:
            lost = sum(n for (_, n), _ in failed)
            topics = ", ".join(sorted({t for (t, _), _ in failed}))
            first = failed[0][1]
            raise EventBusError(
                f"{lost} of {total} messages were not published to topic(s) {topics}: {first!r}"
            ) from first


class _TopicPlan:
    """One topic's part of a publish call: its partitions, the shared key -> partition cache for that
    partition layout, and the record batches being filled per partition (in order)."""

    __slots__ = ("all_partitions", "available", "batches", "cache")

    def __init__(self, all_partitions: tuple[int, ...], available: list[int], cache: dict[str, int]) -> None:
        self.all_partitions = all_partitions
        self.available = available
        self.cache = cache
        self.batches: dict[int, list[Any]] = {}

    def choose(self, key: str) -> int:
        """The partition aiokafka's DefaultPartitioner picks for ``key`` (murmur2 as in the Java client),
        remembered: murmur2 in pure Python costs ~20 us a key."""
        cache = self.cache
        if len(cache) >= _PARTITION_CACHE_SIZE:
            cache.clear()
        partition: int = _PARTITIONER(key.encode(), list(self.all_partitions), self.available)
        cache[key] = partition
        return partition
