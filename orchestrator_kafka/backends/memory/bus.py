"""The in-process event bus, with the semantics of the Kafka one: topics with partitions chosen by key,
consumer groups with committed offsets and at-least-once redelivery. Every operation is atomic with
respect to other coroutines of the event loop, because none awaits inside its critical section.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from ...constants import DEFAULT_TOPIC_PREFIX
from ...errors import EventBusError, StoreFullError, ValidationError
from ...ports import BatchHandler, IEventBus, MessageHandler, Subscription, Watch, WatchHandler, finished
from ...values import InboundMessage, OutboxMessage
from ..slots import Partition, Position, Slots

_log = logging.getLogger("orchestrator_kafka.memory")


# ---------------------------------------------------------------- the event bus

_STOP_GRACE = 30.0  # seconds a stopping member waits for the batch in hand
# The messages each partition keeps by default, as Kafka's retention does by time or size: the newest.
RETENTION_MESSAGES = 100_000


class _PartitionLog:
    """One partition's messages: offsets count from the first ever appended, and only the newest
    ``retention`` are kept. The oldest go in chunks of a tenth, so trimming costs little per message."""

    __slots__ = ("base", "entries", "retention")

    def __init__(self, retention: int) -> None:
        self.base = 0  # the offset of entries[0]
        self.entries: list[InboundMessage] = []
        self.retention = retention

    @property
    def end(self) -> int:
        """The offset the next message gets."""
        return self.base + len(self.entries)

    def append(self, message: InboundMessage) -> None:
        self.entries.append(message)
        extra = len(self.entries) - self.retention
        if extra > self.retention // 10:
            del self.entries[:extra]
            self.base += extra

    def since(self, offset: int, limit: int | None = None) -> list[InboundMessage]:
        """The messages from ``offset`` on (up to ``limit``); from the oldest kept when ``offset`` was
        trimmed away, as a Kafka consumer resets to the earliest offset."""
        start = max(offset - self.base, 0)
        return self.entries[start : None if limit is None else start + limit]


@dataclass(eq=False)
class _Member(Subscription):
    broker: _Broker
    topics: tuple[str, ...]
    group: str
    handler: BatchHandler
    max_batch: int
    redelivery_delay: float
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    assigned: list[tuple[str, int]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    stopping: bool = False

    async def stop(self) -> None:
        """Stop after the batch in hand (and its completion) is handled and committed; idempotent."""
        if self.task is None:
            return
        task, self.task = self.task, None
        self.stopping = True
        self.wake.set()
        try:
            # Bounded like the Kafka bus's grace period: a batch still running then is cancelled
            # uncommitted.
            done, _ = await asyncio.wait({task}, timeout=_STOP_GRACE)
            if not done:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        finally:
            self.broker.leave(self)

    async def run(self) -> None:
        backoff = self.redelivery_delay
        while not self.stopping:
            batch = self.broker.fetch(self)
            if not batch:
                self.wake.clear()
                await self.wake.wait()
                continue
            try:
                completion = await self.handler(batch)
                if completion is not None:
                    # Fetching starts at the committed offsets: no pipelining here, the batch's
                    # completion finishes before the commit and the next fetch.
                    await finished(completion)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a failing handler gets its batch again, as on Kafka
                if isinstance(exc, StoreFullError):  # the orchestrator says so, once per interval
                    _log.debug("group %s: the state store is full; redelivering", self.group)
                else:
                    _log.exception(
                        "handler of group %s failed; redelivering %d messages", self.group, len(batch)
                    )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = self.redelivery_delay
            self.broker.commit(self.group, batch)


@dataclass(eq=False)
class _Consumer(Subscription):
    """A member of a per-message subscription (:meth:`InMemoryEventBus.consume`)."""

    broker: _Broker
    topics: tuple[str, ...]
    group: str
    handler: MessageHandler
    concurrency: int
    grace: float
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    assigned: list[tuple[str, int]] = field(default_factory=list)
    # Partitions taken away by a rebalance while handlers of theirs ran: drained, then released.
    revoked: set[Partition] = field(default_factory=set)
    # The next offset to hand over, per partition owned (from the committed offset when first fetched).
    positions: dict[Partition, int] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None
    stopping: bool = False
    slots: Slots = field(init=False)
    _turn: int = 0

    def __post_init__(self) -> None:
        self.slots = Slots(
            self.handler,
            concurrency=self.concurrency,
            group=self.group,
            commit=self._commit,
            on_free=self.wake.set,
        )

    async def _commit(self, positions: dict[Partition, Position]) -> None:
        self.broker.commit_positions(self.group, positions)

    async def stop(self) -> None:
        """Stop fetching, give the handlers running ``grace`` seconds, commit what finished and leave;
        idempotent. Handlers still running then are cancelled and delivered again to the group."""
        if self.task is None:
            return
        task, self.task = self.task, None
        self.stopping = True
        task.cancel()  # it only ever waits for a message or a slot
        with contextlib.suppress(asyncio.CancelledError):
            await task
        try:
            await self.slots.drain(None, self.grace)
        finally:
            self.broker.release(self.group, self.revoked)
            self.revoked = set()
            self.broker.leave(self)

    async def run(self) -> None:
        while not self.stopping:
            if self.revoked:
                revoked = set(self.revoked)
                await self.slots.drain(revoked, self.grace)
                self.revoked -= revoked
                self.broker.release(self.group, revoked)
                continue
            free = self.slots.free
            batch = self.broker.take(self, free) if free > 0 else []
            if not batch:
                self.wake.clear()
                await self.wake.wait()
                continue
            for message in batch:
                self.slots.start(message)

    def reassign(self, partitions: list[tuple[str, int]]) -> set[Partition]:
        """Own ``partitions`` from now on. As aiokafka's (eager) rebalance does, every partition owned
        before is revoked, even one assigned again: the partitions this member took messages of are
        returned, held (fetchable by nobody) until it has drained them and committed."""
        revoked = set(self.assigned)
        self.assigned = partitions
        self.positions.clear()  # owned again or not, read on from the committed offset
        # Even when nothing of theirs runs any more, their last watermarks may not be committed yet.
        held = {p for p in revoked if self.slots.tracks(p)}
        self.revoked |= held
        return held


class _Broker:
    """The shared part: topic logs, committed offsets and group membership."""

    def __init__(self, partitions: int, retention: int) -> None:
        self.partitions = partitions
        self.retention = retention
        self.logs: dict[str, list[_PartitionLog]] = {}
        self.committed: dict[tuple[str, str, int], int] = defaultdict(int)
        # What a per-message member committed as done above each offset (Kafka: the commit's metadata).
        self.done_above: dict[tuple[str, str, int], tuple[int, ...]] = {}
        self.members: dict[str, list[_Member | _Consumer]] = defaultdict(list)
        self.readers: set[asyncio.Event] = set()
        # Partitions revoked from a per-message member still draining them, per group: nobody fetches
        # them until it has committed what finished (as Kafka waits for the revocation callback).
        self.held: dict[str, set[Partition]] = defaultdict(set)

    def log(self, topic: str) -> list[_PartitionLog]:
        log = self.logs.get(topic)
        if log is None:
            log = self.logs[topic] = [_PartitionLog(self.retention) for _ in range(self.partitions)]
        return log

    def append(self, messages: Sequence[OutboxMessage]) -> None:
        touched: set[str] = set()
        for m in messages:
            key = m.key.encode()
            partition = zlib.crc32(key) % self.partitions
            log = self.log(m.topic)[partition]
            log.append(InboundMessage(m.topic, partition, log.end, key, m.value, tuple(m.headers)))
            touched.add(m.topic)
        for members in self.members.values():
            for member in members:
                if touched.intersection(member.topics):
                    member.wake.set()
        for reader in self.readers:
            reader.set()

    def join(self, member: _Member | _Consumer) -> None:
        for topic in member.topics:
            self.log(topic)
        self.members[member.group].append(member)
        self.rebalance(member.group)

    def leave(self, member: _Member | _Consumer) -> None:
        members = self.members[member.group]
        if member in members:
            members.remove(member)
            self.rebalance(member.group)

    def rebalance(self, group: str) -> None:
        members = self.members[group]
        plan: dict[int, list[tuple[str, int]]] = {id(m): [] for m in members}
        for topic in sorted({t for m in members for t in m.topics}):
            takers = [m for m in members if topic in m.topics]
            for partition in range(self.partitions):
                plan[id(takers[partition % len(takers)])].append((topic, partition))
        for member in members:
            if isinstance(member, _Consumer):
                self.held[group] |= member.reassign(plan[id(member)])
            else:
                member.assigned = plan[id(member)]
            member.wake.set()

    def release(self, group: str, partitions: set[Partition]) -> None:
        """A member drained ``partitions``: their new owners may fetch them."""
        self.held[group] -= partitions
        for member in self.members[group]:
            member.wake.set()

    def take(self, member: _Consumer, limit: int) -> list[InboundMessage]:
        """Up to ``limit`` messages for a per-message member, from its positions; the partitions taken in
        turn, so a backlog on one does not starve the others."""
        held = self.held[member.group]
        owned = [p for p in member.assigned if p not in held]
        out: list[InboundMessage] = []
        if not owned:
            return out
        member._turn = (member._turn + 1) % len(owned)
        for i in range(len(owned)):
            where = owned[(member._turn + i) % len(owned)]
            position = member.positions.get(where)
            if position is None:
                key = (member.group, where[0], where[1])
                position = self.committed[key]
                member.slots.skip(where, Position(position, self.done_above.get(key, ())))
            got = self.logs[where[0]][where[1]].since(position, limit - len(out))
            member.positions[where] = got[-1].offset + 1 if got else position
            out.extend(got)
            if len(out) >= limit:
                break
        return out

    def commit_positions(self, group: str, positions: dict[Partition, Position]) -> None:
        for (topic, partition), position in positions.items():
            key = (group, topic, partition)
            if position.offset >= self.committed[key]:
                self.committed[key] = position.offset
                self.done_above[key] = position.done

    def fetch(self, member: _Member) -> list[InboundMessage]:
        batch: list[InboundMessage] = []
        held = self.held[member.group]
        for topic, partition in member.assigned:
            if (topic, partition) in held:
                continue
            start = self.committed[(member.group, topic, partition)]
            batch.extend(self.logs[topic][partition].since(start, member.max_batch - len(batch)))
            if len(batch) >= member.max_batch:
                break
        return batch

    def commit(self, group: str, batch: Sequence[InboundMessage]) -> None:
        for m in batch:
            key = (group, m.topic, m.partition)
            self.committed[key] = max(self.committed[key], m.offset + 1)
            self.done_above.pop(key, None)


class InMemoryEventBus(IEventBus):
    """Topics, partitions by key, consumer groups and committed offsets, in this process.

    Delivery is at least once: a handler that raises gets the same messages again after
    ``redelivery_delay`` (doubling up to 2 s), and offsets are committed only after it returns (and
    its completion, if it returned one, finished: the next batch is fetched only then). :meth:`consume`
    behaves as the Kafka bus's does: a slot per message, watermark commits (with the offsets done above
    the watermark, so a new owner skips them), and a rebalance that holds a revoked partition from its
    new owner until the old one has drained it.
    :meth:`sharing` makes another client of the same in-process broker, as two Kafka clients share one
    cluster: each has its own lifecycle and subscriptions.
    """

    def __init__(
        self,
        *,
        topic_prefix: str = DEFAULT_TOPIC_PREFIX,
        partitions: int = 4,
        redelivery_delay: float = 0.05,
        retention: int = RETENTION_MESSAGES,
    ) -> None:
        """A bus on a broker of its own, whose topics have ``partitions`` partitions that each keep their
        newest ``retention`` messages (a consumer behind that resumes from the oldest kept).

        Raises:
            ValidationError: ``partitions`` or ``retention`` is below 1.
        """
        if partitions < 1 or retention < 1:
            raise ValidationError(
                f"partitions and retention must be at least 1, not {partitions}, {retention}"
            )
        self.topic_prefix = topic_prefix
        self.redelivery_delay = redelivery_delay
        self._broker = _Broker(partitions, retention)
        self._subscriptions: list[_Member | _Consumer | _Watch] = []
        self._started = False

    @classmethod
    def sharing(cls, other: InMemoryEventBus) -> InMemoryEventBus:
        """A new client of ``other``'s broker, with the same prefix and settings."""
        bus = cls(topic_prefix=other.topic_prefix, redelivery_delay=other.redelivery_delay)
        bus._broker = other._broker
        return bus

    async def start(self) -> None:
        self._started = True

    async def stop(self) -> None:
        subscriptions, self._subscriptions = self._subscriptions, []
        for member in subscriptions:
            await member.stop()
        self._started = False

    def _require_started(self) -> None:
        if not self._started:
            raise EventBusError("the event bus is not started: call 'await bus.start()' first")

    async def ensure_topics(self, topics: Sequence[str]) -> None:
        self._require_started()
        for topic in topics:
            self._broker.log(topic)

    async def partition_count(self, topic: str) -> int | None:
        """Every topic of this bus has the broker's partition count."""
        self._require_started()
        return self._broker.partitions

    async def publish(self, messages: Sequence[OutboxMessage]) -> None:
        self._require_started()
        self._broker.append(messages)

    async def subscribe(
        self, topics: Sequence[str], group: str, handler: BatchHandler, *, max_batch: int = 500
    ) -> Subscription:
        self._require_started()
        member = _Member(self._broker, tuple(topics), group, handler, max_batch, self.redelivery_delay)
        self._broker.join(member)
        member.task = asyncio.get_running_loop().create_task(member.run(), name=f"memory-bus:{group}")
        self._subscriptions.append(member)
        return member

    async def consume(
        self,
        topics: Sequence[str],
        group: str,
        handler: MessageHandler,
        *,
        concurrency: int,
        grace: float = 30.0,
    ) -> Subscription:
        """Consume ``topics`` in ``group`` one message at a time, as :meth:`KafkaEventBus.consume` does
        (see :meth:`IEventBus.consume`): slots, watermark commits, and partitions taken away by a
        rebalance held from their new owner until this member has drained them (up to ``grace``).

        Raises:
            ValidationError: no topics, ``concurrency`` < 1 or ``grace`` < 0.
            EventBusError: not started.
        """
        self._require_started()
        if not topics:
            raise ValidationError("consume needs at least one topic")
        if concurrency < 1:
            raise ValidationError("concurrency must be at least 1")
        if grace < 0:
            raise ValidationError("grace must not be negative")
        member = _Consumer(self._broker, tuple(topics), group, handler, concurrency, grace)
        self._broker.join(member)
        member.task = asyncio.get_running_loop().create_task(member.run(), name=f"memory-bus:{group}")
        self._subscriptions.append(member)
        return member

    async def read(self, topic: str, *, follow: bool = False) -> AsyncIterator[InboundMessage]:
        """Every message of ``topic`` from the first, partition by partition; with ``follow``, then the
        new ones as they arrive. No group, no commits.

        Raises:
            EventBusError: not started, or no such topic.
        """
        self._require_started()
        if topic not in self._broker.logs:
            raise EventBusError(f"no topic {topic!r}")
        log = self._broker.logs[topic]
        positions = [0] * len(log)
        ends = [entries.end for entries in log]  # without follow: the end when the read began
        wake = asyncio.Event()
        self._broker.readers.add(wake)
        try:
            while True:
                wake.clear()
                for partition, entries in enumerate(log):
                    while positions[partition] < (entries.end if follow else ends[partition]):
                        (message,) = entries.since(positions[partition], 1)
                        positions[partition] = message.offset + 1
                        yield message
                if not follow:
                    return
                await wake.wait()
        finally:
            self._broker.readers.discard(wake)

    async def watch(self, topic: str, handler: WatchHandler) -> Watch:
        """Hand ``handler`` each message published to ``topic`` from now on; no group, no commits. Ends
        when stopped or when this bus stops.

        Raises:
            EventBusError: not started, or no such topic.
        """
        self._require_started()
        if topic not in self._broker.logs:
            raise EventBusError(f"no topic {topic!r}")
        watch = _Watch(self._broker, topic, handler)
        self._subscriptions.append(watch)
        return watch

    def messages(self, topic: str) -> list[InboundMessage]:
        """Every message of ``topic`` kept (see ``retention``), partition by partition (for audits and
        tests)."""
        return [m for log in self._broker.logs.get(topic, []) for m in log.entries]


class _Watch(Watch):
    """A watch of one topic of an in-memory broker: from the end each partition had when it began."""

    def __init__(self, broker: _Broker, topic: str, handler: WatchHandler) -> None:
        self._log = broker.logs[topic]
        self._positions = [entries.end for entries in self._log]
        self._handler = handler
        self._broker = broker
        self._wake = asyncio.Event()
        self._stopping = False
        broker.readers.add(self._wake)
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"memory-bus:watch:{topic}")

    async def _run(self) -> None:
        try:
            while not self._stopping:
                self._wake.clear()
                batch: list[InboundMessage] = []
                for partition, entries in enumerate(self._log):
                    batch.extend(entries.since(self._positions[partition]))
                    self._positions[partition] = entries.end
                if batch:
                    self._handler(batch)
                await self._wake.wait()
        finally:
            self._broker.readers.discard(self._wake)

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        await asyncio.wait({self._task})

    async def ended(self) -> None:
        await asyncio.shield(self._task)
