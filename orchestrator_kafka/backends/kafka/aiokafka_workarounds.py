"""Every workaround of an aiokafka bug, and the only module of the package that touches aiokafka's
private attributes or leans on how its internals behave.

Each names the upstream issue it works around and the aiokafka version it was checked against (0.13.0,
the newest that pyproject.toml allows when this was written). On an aiokafka upgrade, this is the module
to check against the changelog: a workaround whose issue is fixed can go, and one whose private attribute
moved must follow it. Private attributes are looked up defensively (``getattr`` with a default) where a
missing one must not break the bus.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka.protocol.offset import OffsetRequest

from .teardown import quietly

__all__ = [
    "InTurn",
    "partitions_served",
    "producer_is_dead",
    "set_linger",
    "stop_consumer",
    "why_producer_died",
]

_log = logging.getLogger("orchestrator_kafka.kafka")


# ---------------------------------------------------------------- the producer that dies for good
#
# https://github.com/aio-libs/aiokafka/issues/1017 (open; seen on aiokafka 0.13.0): the idempotent
# producer dies for good on some errors (OutOfOrderSequenceNumber after a rejected batch): its sender task
# ends and every later send raises the same error. Only a new producer (a new producer id) publishes
# again, and aiokafka has no public way to tell that its producer is dead: its sender task is private.


def producer_is_dead(producer: Any) -> bool:
    """True when an aiokafka producer's sender task has ended: it will never deliver again."""
    task = getattr(getattr(producer, "_sender", None), "sender_task", None)
    return task is not None and task.done()


def why_producer_died(producer: Any) -> BaseException | None:
    """The error that ended a dead producer's sender task; None if it was cancelled or had none."""
    task = producer._sender.sender_task
    reason: BaseException | None = task.exception() if task.done() and not task.cancelled() else None
    return reason


# ---------------------------------------------------------------- a linger that adapts to load
#
# Not an aiokafka bug: aiokafka's linger_ms is not the Java client's. Its sender sends whatever is queued
# as soon as the broker has no request of this producer in flight, and after each produce response
# sleeps what is left of linger_ms since that request began (Sender._send_produce_req, aiokafka 0.13.0).
# So linger_ms is a floor on the time between two requests: under load it makes fewer, larger requests,
# but when idle it delays every message that follows another within linger_ms, which is each hop of a
# saga run alone (a few ms each). Only the sender's private _linger_time can change it on a running
# producer.


def set_linger(producer: Any, seconds: float) -> None:
    """Make a running aiokafka producer linger ``seconds`` between requests from now on (a no-op if the
    private attribute is gone: the producer then keeps the linger it was made with)."""
    sender = getattr(producer, "_sender", None)
    if sender is not None and hasattr(sender, "_linger_time"):
        sender._linger_time = seconds


# ---------------------------------------------------------------- batches queued in turn


class InTurn:
    """Hands record batches to a producer's ``send_batch`` one caller at a time per (topic, partition),
    first come first served.

    aiokafka's ``add_batch`` (under ``send_batch``) lets a batch wait while the partition has one queued,
    and takes the *total* time waited off its timeout after every wake-up: with a few hundred concurrent
    publish calls (a service starting sagas per request) the waits add up quadratically and the later
    calls fail with KafkaTimeoutError after a second or so of real waiting. Behind this lock, a batch
    waits for at most the one queued before it. Upstream this is the wake-up loop of
    https://github.com/aio-libs/aiokafka/issues/528 (every waiter woken for each free slot; open), which
    https://github.com/aio-libs/aiokafka/pull/814 (a waitlist with one timeout; not merged) would replace;
    no issue reports the timeout arithmetic itself (seen in aiokafka 0.13.0,
    ``MessageAccumulator.add_batch``). Touches no private name, but relies on that internal behaviour.
    """

    def __init__(self) -> None:
        self._locks: dict[tuple[str, int], asyncio.Lock] = {}

    async def send_batch(self, producer: Any, batch: Any, topic: str, partition: int) -> Any:
        """``producer.send_batch(batch, topic, partition=partition)`` once the callers before this one
        for that partition have had their batches accepted; the batch's delivery future."""
        where = (topic, partition)
        lock = self._locks.get(where)
        if lock is None:
            lock = self._locks[where] = asyncio.Lock()
        async with lock:
            return await producer.send_batch(batch, topic, partition=partition)


# ---------------------------------------------------------------- consumer.stop() leaking a cancellation


async def stop_consumer(consumer: Any, limit: float) -> None:
    """Stop an aiokafka consumer, bounded, and finish the job when aiokafka gives up half-way."""
    try:
        await quietly("consumer stop", consumer.stop(), limit)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # a real cancellation of the caller
        # https://github.com/aio-libs/aiokafka/issues/647 (open; the fix,
        # https://github.com/aio-libs/aiokafka/pull/1000, is not merged; the same pattern is discussed in
        # https://github.com/aio-libs/aiokafka/issues/983). Still so in aiokafka 0.13.0: Fetcher.close()
        # awaits its cancelled fetch tasks without suppressing CancelledError, so with the broker down (a
        # task sleeping in its retry backoff) consumer.stop() raises CancelledError into a caller nobody
        # cancelled and skips closing the remaining tasks and the connections. Close them here (private
        # attributes, so looked up defensively).
        _log.debug("aiokafka consumer.stop() leaked a CancelledError; finishing the close")
        fetcher = getattr(consumer, "_fetcher", None)
        pending = list(getattr(fetcher, "_pending_tasks", ()))
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        client = getattr(consumer, "_client", None)
        if client is not None:
            await quietly("consumer client close", client.close(), limit)


# ---------------------------------------------------------------- a new partition's leader, serving
#
# Not an aiokafka bug: after CreateTopics, the metadata names a partition's leader a moment before that
# broker serves the partition (in KRaft it learns of its leadership from the metadata log). A consumer
# of a new group resetting its offsets meanwhile gets NotLeaderForPartitionError, which aiokafka logs at
# ERROR ("Failed fetch offsets from <node>") before retrying. aiokafka's admin client has no ListOffsets
# call, so this sends one through its private client (checked against aiokafka 0.13.0).


async def partitions_served(admin: Any, leaders: dict[int, list[tuple[str, int]]]) -> bool:
    """True when every ``(topic, partition)`` of ``leaders`` (by leader node id) answers a ListOffsets
    request at its leader without an error."""
    client = admin._client
    for node_id, partitions in leaders.items():
        topics: dict[str, list[tuple[int, int]]] = {}
        for topic, partition in partitions:
            topics.setdefault(topic, []).append((partition, -2))  # -2: the earliest offset
        response = await client.send(node_id, OffsetRequest(-1, 0, list(topics.items())))
        for _, answers in response.topics:
            if any(answer[1] != 0 for answer in answers):  # (partition, error_code, ...)
                return False
    return True
