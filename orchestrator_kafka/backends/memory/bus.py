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
from ...errors import EventBusError
from ...ports import BatchHandler, IEventBus, Subscription, finished
from ...values import InboundMessage, OutboxMessage

_log = logging.getLogger("orchestrator_kafka.memory")


# ---------------------------------------------------------------- the event bus

_STOP_GRACE = 30.0  # seconds a stopping member waits for the batch in hand


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
            except Exception:  # noqa: BLE001 - a failing handler gets its batch again, as on Kafka
                _log.exception("handler of group %s failed; redelivering %d messages", self.group, len(batch))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = self.redelivery_delay
            self.broker.commit(self.group, batch)


class _Broker:
    """The shared part: topic logs, committed offsets and group membership."""

    def __init__(self, partitions: int) -> None:
        self.partitions = partitions
        self.logs: dict[str, list[list[InboundMessage]]] = {}
        self.committed: dict[tuple[str, str, int], int] = defaultdict(int)
        self.members: dict[str, list[_Member]] = defaultdict(list)
        self.readers: set[asyncio.Event] = set()

    def log(self, topic: str) -> list[list[InboundMessage]]:
        log = self.logs.get(topic)
        if log is None:
            log = self.logs[topic] = [[] for _ in range(self.partitions)]
        return log

    def append(self, messages: Sequence[OutboxMessage]) -> None:
        touched: set[str] = set()
        for m in messages:
            key = m.key.encode()
            partition = zlib.crc32(key) % self.partitions
            log = self.log(m.topic)[partition]
            log.append(InboundMessage(m.topic, partition, len(log), key, m.value, tuple(m.headers)))
            touched.add(m.topic)
        for members in self.members.values():
            for member in members:
                if touched.intersection(member.topics):
                    member.wake.set()
        for reader in self.readers:
            reader.set()

    def join(self, member: _Member) -> None:
        for topic in member.topics:
            self.log(topic)
        self.members[member.group].append(member)
        self.rebalance(member.group)

    def leave(self, member: _Member) -> None:
        members = self.members[member.group]
        if member in members:
            members.remove(member)
            self.rebalance(member.group)

    def rebalance(self, group: str) -> None:
        members = self.members[group]
        for member in members:
            member.assigned = []
        for topic in sorted({t for m in members for t in m.topics}):
            takers = [m for m in members if topic in m.topics]
            for partition in range(self.partitions):
                takers[partition % len(takers)].assigned.append((topic, partition))
        for member in members:
            member.wake.set()

    def fetch(self, member: _Member) -> list[InboundMessage]:
        batch: list[InboundMessage] = []
        for topic, partition in member.assigned:
            start = self.committed[(member.group, topic, partition)]
            log = self.logs[topic][partition]
            batch.extend(log[start : start + member.max_batch - len(batch)])
            if len(batch) >= member.max_batch:
                break
        return batch

    def commit(self, group: str, batch: Sequence[InboundMessage]) -> None:
        for m in batch:
            key = (group, m.topic, m.partition)
            self.committed[key] = max(self.committed[key], m.offset + 1)


class InMemoryEventBus(IEventBus):
    """Topics, partitions by key, consumer groups and committed offsets, in this process.

    Delivery is at least once: a handler that raises gets the same messages again after
    ``redelivery_delay`` (doubling up to 2 s), and offsets are committed only after it returns (and
    its completion, if it returned one, finished: the next batch is fetched only then).
    :meth:`sharing` makes another client of the same in-process broker, as two Kafka clients share one
    cluster: each has its own lifecycle and subscriptions.
    """

    def __init__(
        self, *, topic_prefix: str = DEFAULT_TOPIC_PREFIX, partitions: int = 4, redelivery_delay: float = 0.05
    ) -> None:
        self.topic_prefix = topic_prefix
        self.redelivery_delay = redelivery_delay
        self._broker = _Broker(partitions)
        self._subscriptions: list[_Member] = []
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
        ends = [len(entries) for entries in log]  # without follow: the end when the read began
        wake = asyncio.Event()
        self._broker.readers.add(wake)
        try:
            while True:
                wake.clear()
                for partition, entries in enumerate(log):
                    while positions[partition] < (len(entries) if follow else ends[partition]):
                        positions[partition] += 1
                        yield entries[positions[partition] - 1]
                if not follow:
                    return
                await wake.wait()
        finally:
            self._broker.readers.discard(wake)

    def messages(self, topic: str) -> list[InboundMessage]:
        """Every message published to ``topic`` so far, partition by partition (for audits and tests)."""
        return [m for log in self._broker.logs.get(topic, []) for m in log]
