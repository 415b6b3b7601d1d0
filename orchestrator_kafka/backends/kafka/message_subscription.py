"""The per-message subscription: :class:`KafkaMessageSubscription`, one consumer-group member handing each
message to a handler in a slot of its own (:meth:`KafkaEventBus.consume`, DESIGN section 10).

* It fetches only as many records as slots are free, so a slow handler never holds up the messages behind
  it. With every slot taken it pauses its partitions and keeps polling, so aiokafka counts it as active
  (``max_poll_interval_ms`` is measured between fetches) and the group keeps it; it resumes them when a
  slot frees. aiokafka drops what it had buffered for a paused partition and fetches it again on resume.
* Offsets are committed per partition up to the first message not done (:mod:`..watermarks`), in the
  background every few ms (:mod:`..slots`), with the offsets above it already done in the commit's
  metadata. Before it hands over the first record of a partition it gets, it reads that metadata back
  (through the admin client), so what a crashed or departed owner finished is not run again.
* On revocation the revoked partitions' handlers get the grace period, what finished is committed, and
  only then does the rebalance go on; ``stop`` drains every partition the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import ConsumerStoppedError, IllegalStateError, KafkaError

from ...ports import MessageHandler
from ...values import InboundMessage
from ..slots import Partition, Position, Slots
from .aiokafka_workarounds import stop_consumer
from .member import GroupMember

__all__ = ["KafkaMessageSubscription"]

_log = logging.getLogger("orchestrator_kafka.kafka")

# How long one getmany waits for records; stopping cancels the wait, so this only bounds idle loops.
_POLL_TIMEOUT_MS = 1000
# With every slot taken: how often the member polls (its partitions paused, so it gets nothing) to stay
# active in the group, if no slot frees first. Well under any sensible max_poll_interval_ms.
_POLL_WHILE_FULL = 1.0
_BACKOFF_START = 0.1
_BACKOFF_MAX = 5.0


class KafkaMessageSubscription(GroupMember):
    """One consumer-group member running a :data:`MessageHandler` per message; made by
    :meth:`KafkaEventBus.consume`."""

    _task_name = "kafka-consume"

    def __init__(
        self,
        consumer: Any,
        topics: Sequence[str],
        group: str,
        handler: MessageHandler,
        *,
        concurrency: int,
        grace: float,
        stop_limit: float,
        read_committed: Callable[[list[Any]], Awaitable[dict[Any, Any]]],
        on_stopped: Callable[[KafkaMessageSubscription], None],
    ) -> None:
        super().__init__(consumer, topics, group)
        self._grace = grace
        self._stop_limit = stop_limit
        self._on_stopped = on_stopped
        self._read_committed = read_committed
        # Partitions whose committed metadata was read since they were assigned.
        self._known: set[Partition] = set()
        self._slot_freed = asyncio.Event()
        self.slots = Slots(
            handler, concurrency=concurrency, group=group, commit=self._commit, on_free=self._slot_freed.set
        )
        # Partitions being revoked: records of theirs fetched meanwhile are not started. And a count of
        # revocations, so records fetched before one (whose partitions' positions it reset) are dropped.
        self._revoking: set[Partition] = set()
        self._revocations = 0
        self._stopping = False
        self._backoff = _BACKOFF_START

    def _listener(self) -> ConsumerRebalanceListener:
        return _Listener(self)

    async def _shutdown(self) -> None:
        """Stop fetching, give the handlers running the grace period, commit what finished and leave the
        group; idempotent and safe to call concurrently. Handlers still running after the grace are
        cancelled (and logged): their messages are delivered again to the group."""
        self._stopping = True
        task = self._task
        if task is not None and not task.done():
            task.cancel()  # it only ever waits in a fetch or for a slot
            await asyncio.wait({task})
        await self.slots.drain(None, self._grace)
        await stop_consumer(self._consumer, self._stop_limit)
        self._on_stopped(self)

    async def _run(self) -> None:
        while not self._stopping:
            try:
                if self.slots.free <= 0:
                    await self._wait_for_a_slot()
                    continue
                revoking = self._revoking
                paused = [tp for tp in self._consumer.paused() if (tp.topic, tp.partition) not in revoking]
                if paused:
                    self._consumer.resume(*paused)
                records = await self._consumer.getmany(
                    timeout_ms=_POLL_TIMEOUT_MS, max_records=self.slots.free
                )
            except ConsumerStoppedError:
                return
            except Exception:  # noqa: BLE001 - a consumer that dies silently is the worst outcome
                _log.exception("group %s: fetch failed; retrying in %.1fs", self.group, self._backoff)
                await asyncio.sleep(self._backoff)
                self._backoff = min(self._backoff * 2, _BACKOFF_MAX)
                continue
            self._backoff = _BACKOFF_START
            await self._hand_over(records)

    async def _wait_for_a_slot(self) -> None:
        """Every slot is taken: pause the partitions, and keep polling until a slot frees."""
        consumer = self._consumer
        consumer.pause(*consumer.assignment())
        self._slot_freed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_POLL_WHILE_FULL):
                await self._slot_freed.wait()
        if self.slots.free <= 0:
            # Paused partitions return nothing; a partition assigned since the pause may (then it is
            # sought back by _hand_over).
            consumer.pause(*consumer.assignment())
            await self._hand_over(await consumer.getmany(timeout_ms=0))

    async def _hand_over(self, records: dict[Any, list[Any]]) -> None:
        """Start a handler for each record while slots are free; seek every partition back to its first
        record not started, so it is fetched again."""
        new = [tp for tp in records if (tp.topic, tp.partition) not in self._known]
        if new:
            before = self._revocations
            await self._read_done(new)
            if self._revocations != before:
                return  # fetched before a rebalance: read again from the committed offsets
        slots = self.slots
        for tp, recs in records.items():
            where = (tp.topic, tp.partition)
            if where in self._revoking:
                continue  # its next owner reads it from the committed offset
            for i, r in enumerate(recs):
                if slots.free <= 0:
                    with contextlib.suppress(IllegalStateError):
                        self._consumer.seek(tp, recs[i].offset)
                    break
                slots.start(InboundMessage(r.topic, r.partition, r.offset, r.key, r.value, tuple(r.headers)))

    async def _read_done(self, partitions: list[Any]) -> None:
        """Read what the previous owner of ``partitions`` committed as done above its offset."""
        try:
            committed = await self._read_committed(partitions)
        except (KafkaError, OSError) as exc:
            # Only costs redelivery: what it had finished above its offset runs again.
            _log.warning(
                "group %s: could not read the committed offsets of %s: %r", self.group, partitions, exc
            )
            committed = {}
        for tp in partitions:
            meta = committed.get(tp)
            if meta is not None and meta.offset >= 0:
                self.slots.skip((tp.topic, tp.partition), Position.decode(meta.offset, meta.metadata))
            self._known.add((tp.topic, tp.partition))

    async def _commit(self, positions: dict[Partition, Position]) -> None:
        # Only owned partitions: aiokafka refuses the whole commit if one is not assigned.
        owned = self._consumer.assignment()
        mine = {
            tp: (position.offset, position.encode())
            for tp, position in ((TopicPartition(t, p), pos) for (t, p), pos in positions.items())
            if tp in owned
        }
        if not mine:
            return
        try:
            await self._consumer.commit(mine)
        except (KafkaError, OSError) as exc:
            # CommitFailedError after the group moved on: the partitions' new owner starts from the last
            # committed offset and sees these messages again (at least once).
            _log.warning("group %s: commit of %s failed: %r", self.group, mine, exc)

    async def _release(self, revoked: set[Any]) -> None:
        where = {(tp.topic, tp.partition) for tp in revoked}
        self._revocations += 1
        self._revoking |= where
        try:
            with contextlib.suppress(IllegalStateError):
                self._consumer.pause(*revoked)  # nothing more of them while they drain
            await self.slots.drain(where, self._grace)
        finally:
            self._revoking -= where
            self._known -= where


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka's ABC is untyped
    def __init__(self, subscription: KafkaMessageSubscription) -> None:
        self._sub = subscription

    async def on_partitions_revoked(self, revoked: set[Any]) -> None:
        # aiokafka awaits this before re-joining, while the generation is still valid: the handlers of the
        # revoked partitions finish (within the grace) and their offsets are committed before another
        # member takes the partitions, so only what was still running is delivered again.
        if revoked:
            await self._sub._release(revoked)

    async def on_partitions_assigned(self, assigned: set[Any]) -> None:
        _log.debug("group %s: assigned %s", self._sub.group, sorted(map(str, assigned)))
        self._sub._assigned.set()
