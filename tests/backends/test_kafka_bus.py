"""KafkaEventBus against a real broker (``KAFKA_BOOTSTRAP_SERVERS``, default 127.0.0.1:9092); the tests
that need none are in ``test_kafka_bus_unit.py``.

Every test uses its own topic prefix and group names, so tests never see each other's messages.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import NewTopic
from aiokafka.structs import TopicPartition

from orchestrator_kafka.backends.kafka import KafkaEventBus, KafkaSubscription
from orchestrator_kafka.errors import EventBusError
from orchestrator_kafka.values import InboundMessage, OutboxMessage

from ..conftest import unique

KAFKA = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
ALL_PARTITIONS = 4


def _uid(name: str) -> str:
    return unique(name)  # recorded, so the session-end cleanup deletes this session's topics


def _require_kafka() -> None:
    host, _, port = KAFKA.split(",")[0].rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=1.0):
            return
    except OSError:
        pytest.fail(f"Kafka is not reachable at {KAFKA}: run 'scripts/services up'")


@pytest.fixture
async def bus() -> AsyncIterator[KafkaEventBus]:
    _require_kafka()
    b = KafkaEventBus(KAFKA, topic_prefix=_uid("t"), partitions=ALL_PARTITIONS, start_timeout=20)
    await b.start()
    try:
        yield b
    finally:
        await b.stop()


def _topic(bus: KafkaEventBus, name: str) -> str:
    return f"{bus.topic_prefix}.{name}"


class Collector:
    """A batch handler that records what it got and wakes waiters when enough has arrived."""

    def __init__(self, fail: Callable[[int, Sequence[InboundMessage]], bool] | None = None) -> None:
        self.batches: list[list[InboundMessage]] = []
        self.failed: list[list[InboundMessage]] = []
        self.calls = 0
        self._fail = fail
        self._changed = asyncio.Event()

    async def __call__(self, batch: Sequence[InboundMessage]) -> None:
        self.calls += 1
        self._changed.set()
        if self._fail is not None and self._fail(self.calls, batch):
            self.failed.append(list(batch))
            raise RuntimeError("handler failure on purpose")
        self.batches.append(list(batch))

    @property
    def messages(self) -> list[InboundMessage]:
        return [m for b in self.batches for m in b]

    async def wait_until(self, cond: Callable[[], bool], within: float = 30.0) -> None:
        async with asyncio.timeout(within):
            while not cond():
                self._changed.clear()
                await self._changed.wait()

    async def wait_for(self, count: int, within: float = 30.0) -> None:
        await self.wait_until(lambda: len(self.messages) >= count, within)


def _msgs(topic: str, n: int, start: int = 0, keys: int = 10, size: int = 0) -> list[OutboxMessage]:
    pad = b"x" * size
    return [
        OutboxMessage(
            topic,
            f"k{i % keys}",
            b"%d|" % i + pad,
            (("traceparent", b"00-%032x-%016x-01" % (i + 1, i + 1)), ("n", b"%d" % i)),
        )
        for i in range(start, start + n)
    ]


async def _poll_until(cond: Callable[[], bool], within: float) -> None:
    for _ in range(int(within / 0.05)):
        if cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"condition not met within {within}s")


def _ids(messages: Sequence[InboundMessage]) -> list[int]:
    return [int((m.value or b"").split(b"|")[0]) for m in messages]


@pytest.mark.kafka
async def test_publish_then_subscribe_gets_everything_with_keys_and_headers(bus: KafkaEventBus) -> None:
    topic = _topic(bus, "events")
    sent = _msgs(topic, 300)
    await bus.publish(sent)
    got = Collector()
    sub = await bus.subscribe([topic], _uid("g"), got)
    await got.wait_for(300)
    await asyncio.sleep(0.3)  # nothing beyond the 300 (no duplicates) arrives
    assert sorted(_ids(got.messages)) == list(range(300))
    by_id = dict(zip(_ids(got.messages), got.messages, strict=True))
    for i, out in enumerate(sent):
        m = by_id[i]
        assert m.topic == topic
        assert m.key == out.key.encode()
        assert m.value == out.value
        assert m.headers == out.headers
        assert isinstance(m.headers, tuple)
        assert all(isinstance(h, tuple) for h in m.headers)
        assert 0 <= m.partition < ALL_PARTITIONS
    # One key lives on one partition, in publish order.
    per_key: dict[bytes | None, list[int]] = {}
    partition_of: dict[bytes | None, set[int]] = {}
    for m, i in zip(got.messages, _ids(got.messages), strict=True):
        per_key.setdefault(m.key, []).append(i)
        partition_of.setdefault(m.key, set()).add(m.partition)
    assert all(ids == sorted(ids) for ids in per_key.values())
    assert all(len(p) == 1 for p in partition_of.values())
    await sub.stop()


@pytest.mark.kafka
async def test_subscribe_returns_with_partitions_assigned(bus: KafkaEventBus) -> None:
    topic = _topic(bus, "fresh")
    got = Collector()
    sub = await bus.subscribe([topic], _uid("g"), got)
    assert isinstance(sub, KafkaSubscription)
    assert sub.assignment == {(topic, p) for p in range(ALL_PARTITIONS)}
    await bus.publish(_msgs(topic, 8, keys=8))  # right after subscribe returns
    await got.wait_for(8, within=10)
    assert sorted(_ids(got.messages)) == list(range(8))
    await sub.stop()


@pytest.mark.kafka
async def test_subscribe_to_several_topics(bus: KafkaEventBus) -> None:
    a, b = _topic(bus, "a"), _topic(bus, "b")
    got = Collector()
    sub = await bus.subscribe([a, b], _uid("g"), got)
    assert isinstance(sub, KafkaSubscription)
    assert len(sub.assignment) == 2 * ALL_PARTITIONS
    await bus.publish(_msgs(a, 10) + _msgs(b, 10, start=10))
    await got.wait_for(20)
    assert {m.topic for m in got.messages} == {a, b}
    await sub.stop()


@pytest.mark.kafka
async def test_max_batch_is_respected(bus: KafkaEventBus) -> None:
    topic = _topic(bus, "batches")
    await bus.publish(_msgs(topic, 1000, keys=50))
    got = Collector()
    sub = await bus.subscribe([topic], _uid("g"), got, max_batch=37)
    await got.wait_for(1000)
    assert max(len(b) for b in got.batches) <= 37
    assert any(len(b) == 37 for b in got.batches)
    assert sorted(_ids(got.messages)) == list(range(1000))
    await sub.stop()


@pytest.mark.kafka
async def test_failed_batch_is_redelivered_and_only_handled_batches_are_committed(
    bus: KafkaEventBus,
) -> None:
    topic = _topic(bus, "redelivery")
    group = _uid("g")
    await bus.publish(_msgs(topic, 300, keys=30))

    # First call fails, the next two succeed, every later one fails.
    first = Collector(fail=lambda call, batch: call == 1 or call > 3)
    sub = await bus.subscribe([topic], group, first, max_batch=50)

    def first_batch_came_back() -> bool:
        # Every message of the failed first batch was delivered again (other partitions' prefetched
        # records may come first, so not necessarily as the very next batch).
        later = {(m.partition, m.offset) for b in first.batches + first.failed[1:] for m in b}
        return bool(first.failed) and {(m.partition, m.offset) for m in first.failed[0]} <= later

    await first.wait_until(lambda: len(first.failed) >= 4 and first_batch_came_back())
    await sub.stop()
    assert first.batches, "no batch succeeded"
    handled = set(_ids(first.messages))
    assert len(handled) == len(first.messages)  # nothing handled twice
    assert 0 < len(handled) < 300

    # A new member of the same group gets exactly what was not handled: handled offsets were
    # committed, failed ones were not.
    await bus.publish(_msgs(topic, 50, start=300, keys=30))
    second = Collector()
    sub2 = await bus.subscribe([topic], group, second, max_batch=50)
    await second.wait_for(350 - len(handled))
    await asyncio.sleep(0.5)
    again = _ids(second.messages)
    assert not handled.intersection(again), "an already handled message came back"
    assert sorted(handled.union(again)) == list(range(350)), "a message was lost"
    assert len(again) == len(set(again))
    await sub2.stop()


@pytest.mark.kafka
async def test_completions_that_fail_while_batches_keep_coming_lose_nothing(bus: KafkaEventBus) -> None:
    """Pipelined handling across four partitions: completions fail while later batches are fetched and
    handed over. Every message still completes, and once all have, everything is committed."""
    topic = _topic(bus, "completions")
    group = _uid("g")
    await bus.ensure_topics([topic])
    completed: set[int] = set()
    calls = 0

    async def handler(batch: Sequence[InboundMessage]) -> asyncio.Task[None]:
        nonlocal calls
        calls += 1
        fails = calls in (1, 6, 11)  # these completions fail after later batches were handed over
        ids = _ids(batch)

        async def complete() -> None:
            await asyncio.sleep(0.05)
            if fails:
                raise RuntimeError("completion failed")
            completed.update(ids)

        return asyncio.create_task(complete())

    sub = await bus.subscribe([topic], group, handler, max_batch=20)
    # Published while batches fail, so records also arrive while a rewind is pending.
    for start in range(0, 400, 10):
        await bus.publish(_msgs(topic, 10, start=start, keys=40))
        await asyncio.sleep(0.01)
    await _poll_until(lambda: len(completed) == 400, 60)
    await sub.stop()
    assert calls > 20  # 400 messages in batches of at most 20, and the failed ones came again
    # Everything completed was committed: a new member of the group gets only what is new.
    await bus.publish(_msgs(topic, 5, start=400, keys=40))
    later = Collector()
    sub2 = await bus.subscribe([topic], group, later)
    await later.wait_for(5)
    await asyncio.sleep(0.5)
    assert sorted(_ids(later.messages)) == list(range(400, 405))
    await sub2.stop()


@pytest.mark.kafka
async def test_records_fetched_while_a_failed_completion_is_rewound_come_again(bus: KafkaEventBus) -> None:
    """A completion fails while the loop waits for new records, which then arrive on other partitions:
    the loop must rewind those partitions too, or their records would be skipped."""
    topic = _topic(bus, "rewind-window")
    await bus.ensure_topics([topic])
    go = asyncio.Event()
    handled: list[int] = []

    async def handler(batch: Sequence[InboundMessage]) -> asyncio.Task[None]:
        first = not handled and not go.is_set()
        ids = _ids(batch)

        async def complete() -> None:
            if first:
                await go.wait()
                raise RuntimeError("completion failed")
            handled.extend(ids)

        return asyncio.create_task(complete())

    sub = await bus.subscribe([topic], _uid("g"), handler)
    await bus.publish(_msgs(topic, 1, keys=1))
    await asyncio.sleep(0.5)  # batch 0 handed over; its completion waits; the loop waits for records
    await bus.publish(_msgs(topic, 20, start=1, keys=20))  # on every partition
    go.set()  # the completion fails while those records are on their way to the loop
    await _poll_until(lambda: set(handled) == set(range(21)), 30)
    await sub.stop()


@pytest.mark.kafka
async def test_no_batch_is_handed_over_between_a_failed_completion_and_the_rewind(bus: KafkaEventBus) -> None:
    """Batch 2's completion fails while batch 1's still runs: batch 3 must wait for the rewind, or the
    handler would act on it before batch 2's messages come again."""
    topic = _topic(bus, "no-handover")
    await bus.ensure_topics([topic])
    release = asyncio.Event()
    calls: list[list[int]] = []

    async def handler(batch: Sequence[InboundMessage]) -> asyncio.Task[None]:
        calls.append(_ids(batch))
        n = len(calls)

        async def complete() -> None:
            if n == 1:
                await release.wait()
            elif n == 2:
                raise RuntimeError("completion failed")

        return asyncio.create_task(complete())

    sub = await bus.subscribe([topic], _uid("g"), handler)
    await bus.publish(_msgs(topic, 1, start=0, keys=1))
    await _poll_until(lambda: len(calls) == 1, 10)
    await bus.publish(_msgs(topic, 1, start=1, keys=1))
    await _poll_until(lambda: len(calls) == 2, 10)
    await bus.publish(_msgs(topic, 1, start=2, keys=1))
    await asyncio.sleep(1.0)
    assert calls == [[0], [1]]  # batch 3 waits while batch 1 runs and batch 2 has failed
    release.set()
    await _poll_until(lambda: sorted({i for c in calls[2:] for i in c}) == [1, 2], 30)
    assert calls[2][0] == 1  # redelivered from the failed batch
    await sub.stop()


@pytest.mark.kafka
async def test_a_failed_batch_of_one_partition_is_the_next_batch(bus: KafkaEventBus) -> None:
    topic = _topic(bus, "same-batch")
    await bus.publish(_msgs(topic, 120, keys=1))  # one key: one partition
    got = Collector(fail=lambda call, batch: call == 1)
    sub = await bus.subscribe([topic], _uid("g"), got, max_batch=50)
    await got.wait_for(120)
    await sub.stop()
    assert len(got.failed) == 1
    assert [(m.partition, m.offset) for m in got.failed[0]] == [
        (m.partition, m.offset) for m in got.batches[0]
    ]
    assert _ids(got.messages) == list(range(120))  # in order, once each


@pytest.mark.kafka
async def test_backoff_grows_while_the_handler_keeps_failing(bus: KafkaEventBus) -> None:
    topic = _topic(bus, "backoff")
    await bus.publish(_msgs(topic, 5, keys=1))
    times: list[float] = []

    async def always_fails(batch: Sequence[InboundMessage]) -> None:
        times.append(time.monotonic())
        raise RuntimeError("down")

    sub = await bus.subscribe([topic], _uid("g"), always_fails)
    await _poll_until(lambda: len(times) >= 5, within=10)
    await sub.stop()
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # 0.1, 0.2, 0.4, 0.8 s (plus fetch time)
    assert gaps[0] >= 0.09 and gaps[3] >= 0.75
    assert gaps[3] > gaps[0] * 4


@pytest.mark.kafka
async def test_two_subscribers_in_one_group_share_partitions(bus: KafkaEventBus) -> None:
    topic = _topic(bus, "shared")
    group = _uid("g")
    a, b = Collector(), Collector()
    sub_a = await bus.subscribe([topic], group, a)
    sub_b = await bus.subscribe([topic], group, b)
    assert isinstance(sub_a, KafkaSubscription) and isinstance(sub_b, KafkaSubscription)
    await _poll_until(
        lambda: bool(sub_a.assignment and sub_b.assignment and not sub_a.assignment & sub_b.assignment),
        within=15,
    )
    assert sub_a.assignment | sub_b.assignment == {(topic, p) for p in range(ALL_PARTITIONS)}

    await bus.publish(_msgs(topic, 400, keys=40))
    await _poll_until(lambda: len(a.messages) + len(b.messages) >= 400, within=30)
    await asyncio.sleep(0.3)
    ids_a, ids_b = _ids(a.messages), _ids(b.messages)
    assert ids_a and ids_b
    assert sorted(ids_a + ids_b) == list(range(400))
    assert {m.partition for m in a.messages}.isdisjoint({m.partition for m in b.messages})
    await sub_a.stop()
    await sub_b.stop()


@pytest.mark.kafka
async def test_rebalance_waits_for_the_batch_in_hand_so_nothing_is_handled_twice(
    bus: KafkaEventBus,
) -> None:
    topic = _topic(bus, "rebalance")
    group = _uid("g")
    await bus.publish(_msgs(topic, 200, keys=40))
    in_batch = asyncio.Event()
    a_ids: list[int] = []

    async def slow(batch: Sequence[InboundMessage]) -> None:
        in_batch.set()
        await asyncio.sleep(1.5)
        a_ids.extend(_ids(batch))

    sub_a = await bus.subscribe([topic], group, slow, max_batch=500)
    await in_batch.wait()
    b = Collector()
    sub_b = await bus.subscribe([topic], group, b)  # rebalance while A holds a batch
    await asyncio.sleep(0.5)
    await sub_a.stop()
    await _poll_until(lambda: len(set(a_ids) | set(_ids(b.messages))) >= 200, within=30)
    await asyncio.sleep(0.5)
    assert not set(a_ids) & set(_ids(b.messages)), "a batch was handled by both members"
    await sub_b.stop()


@pytest.mark.kafka
async def test_subscription_stop_finishes_the_batch_in_hand_and_commits_it(bus: KafkaEventBus) -> None:
    topic = _topic(bus, "graceful")
    group = _uid("g")
    await bus.publish(_msgs(topic, 50, keys=5))
    started, done = asyncio.Event(), asyncio.Event()

    async def slow(batch: Sequence[InboundMessage]) -> None:
        started.set()
        await asyncio.sleep(0.5)
        done.set()

    sub = await bus.subscribe([topic], group, slow)
    await started.wait()
    await asyncio.gather(sub.stop(), sub.stop())  # concurrent stops are one stop
    assert done.is_set()
    await sub.stop()
    # The batch was committed: a new member of the group sees nothing more.
    again = Collector()
    sub2 = await bus.subscribe([topic], group, again)
    await asyncio.sleep(1.5)
    assert again.messages == []
    await sub2.stop()


@pytest.mark.kafka
async def test_start_and_stop_are_idempotent_and_the_bus_restarts() -> None:
    _require_kafka()
    b = KafkaEventBus(KAFKA, topic_prefix=_uid("t"))
    await b.start()
    await b.start()
    topic = _topic(b, "life")
    got = Collector()
    sub = await b.subscribe([topic], _uid("g"), got)
    await b.stop()
    await b.stop()
    await sub.stop()
    assert not b.started
    with pytest.raises(EventBusError):
        await b.publish(_msgs(topic, 1))
    await b.start()
    await b.publish(_msgs(topic, 3))
    got2 = Collector()
    sub2 = await b.subscribe([topic], _uid("g"), got2)
    await got2.wait_for(3)
    await b.stop()
    await sub2.stop()


@pytest.mark.kafka
async def test_ensure_topics_is_cached_and_tolerates_existing_topics(bus: KafkaEventBus) -> None:
    topics = [_topic(bus, "e1"), _topic(bus, "e2")]
    await bus.ensure_topics(topics)
    t0 = time.perf_counter()
    await bus.ensure_topics(topics)
    assert time.perf_counter() - t0 < 0.001
    # Another bus (empty cache) meets TopicAlreadyExists and carries on.
    other = KafkaEventBus(KAFKA, topic_prefix=bus.topic_prefix)
    await other.start()
    try:
        await other.ensure_topics(topics)
        assert set(topics) <= set(await other._admin.list_topics())
    finally:
        await other.stop()


@pytest.mark.kafka
async def test_publish_failure_is_an_event_bus_error(bus: KafkaEventBus) -> None:
    topic = _topic(bus, "big")
    # Over the 1 MB limit: refused before anything of the call is sent, naming topic and message.
    small = _msgs(topic, 3)
    with pytest.raises(EventBusError, match=rf"message 2 of 4 \(topic '{topic}'.*over the 1,048,576-byte"):
        await bus.publish([*small[:2], OutboxMessage(topic, "k", b"x" * 2_000_000), small[2]])
    with pytest.raises(EventBusError, match="over the 1,048,576-byte limit"):
        await bus.publish([OutboxMessage(topic, "k", b"x" * (1024 * 1024 - 50))])
    # Not bytes: refused too, before anything is sent.
    with pytest.raises(EventBusError, match="cannot be encoded"):
        await bus.publish([small[0], OutboxMessage(topic, "k", "text")])  # type: ignore[arg-type]
    # A large message under the limit goes alone in its batch and arrives.
    await bus.publish([OutboxMessage(topic, "k", b"%d|" % 99 + b"y" * 1_000_000)])
    got = Collector()
    sub = await bus.subscribe([topic], _uid("g"), got)
    await got.wait_for(1)
    await asyncio.sleep(0.5)
    await sub.stop()
    assert _ids(got.messages) == [99]  # none of the refused calls' messages
    with pytest.raises(EventBusError, match="create topic"):
        await bus.publish([OutboxMessage("bad topic name!", "k", b"x")])


@pytest.mark.kafka
async def test_a_batch_the_broker_rejects_is_an_event_bus_error_naming_its_topic(bus: KafkaEventBus) -> None:
    small, fine = _topic(bus, "small-limit"), _topic(bus, "fine")
    response = await bus._admin.create_topics(
        [NewTopic(small, 1, 1, topic_configs={"max.message.bytes": "2000"})], timeout_ms=10_000
    )
    assert all(entry[1] == 0 for entry in response.topic_errors)
    await bus.ensure_topics([small, fine])
    messages = [*_msgs(fine, 5), OutboxMessage(small, "k", b"x" * 5000)]
    with pytest.raises(EventBusError, match=rf"1 of 6 messages were not published to topic\(s\) {small}:"):
        await bus.publish(messages)
    got = Collector()
    sub = await bus.subscribe([fine], _uid("g"), got)
    await got.wait_for(5)
    await sub.stop()
    assert sorted(_ids(got.messages)) == list(range(5))


@pytest.mark.kafka
async def test_keys_land_on_the_partition_another_client_puts_them_on(bus: KafkaEventBus) -> None:
    topic = _topic(bus, "same-partition")
    keys = [str(uuid.uuid4()) for _ in range(200)]
    await bus.publish([OutboxMessage(topic, k, b"%d|bus" % i) for i, k in enumerate(keys)])
    # A plain aiokafka producer with its default partitioner (as the Java client's).
    other = AIOKafkaProducer(bootstrap_servers=KAFKA)
    await other.start()
    try:
        futures = [await other.send(topic, b"other", key=k.encode()) for k in keys]
        expected = {k: (await f).partition for k, f in zip(keys, futures, strict=True)}
    finally:
        await other.stop()
    got = Collector()
    sub = await bus.subscribe([topic], _uid("g"), got)
    await got.wait_for(400)
    await sub.stop()
    for m in got.messages:
        assert m.partition == expected[(m.key or b"").decode()]
    assert len({m.partition for m in got.messages}) == ALL_PARTITIONS


@pytest.mark.kafka
async def test_a_publish_of_several_batches_per_partition_keeps_each_keys_order(bus: KafkaEventBus) -> None:
    a, b = _topic(bus, "multi-a"), _topic(bus, "multi-b")
    # ~1 MB per key: 4 batches of 256 KB each, interleaved over two topics.
    from_a, from_b = _msgs(a, 3000, keys=3, size=900), _msgs(b, 3000, 3000, keys=3, size=900)
    messages = [m for pair in zip(from_a, from_b, strict=True) for m in pair]
    await bus.publish(messages)
    got = Collector()
    sub = await bus.subscribe([a, b], _uid("g"), got)
    await got.wait_for(6000)
    await asyncio.sleep(0.3)
    await sub.stop()
    assert sorted(_ids(got.messages)) == list(range(6000))
    per_key: dict[tuple[str, bytes | None], list[int]] = {}
    partition_of: dict[tuple[str, bytes | None], set[int]] = {}
    for m, i in zip(got.messages, _ids(got.messages), strict=True):
        per_key.setdefault((m.topic, m.key), []).append(i)
        partition_of.setdefault((m.topic, m.key), set()).add(m.partition)
    assert all(ids == sorted(ids) for ids in per_key.values())
    assert all(len(p) == 1 for p in partition_of.values())
    # The batches were idempotent: aiokafka gave them sequence numbers (private state, checked so that
    # an aiokafka upgrade which stops doing so for send_batch is noticed).
    txn = bus._producer._txn_manager
    assert txn is not None and txn.producer_id >= 0
    counts: dict[tuple[str, int], int] = {}
    for m in got.messages:
        counts[(m.topic, m.partition)] = counts.get((m.topic, m.partition), 0) + 1
    for (topic, partition), n in counts.items():
        assert txn.sequence_number(TopicPartition(topic, partition)) == n


@pytest.mark.kafka
async def test_fetch_max_wait_ms_reaches_the_consumers() -> None:
    _require_kafka()
    b = KafkaEventBus(KAFKA, topic_prefix=_uid("t"), fetch_max_wait_ms=250)
    await b.start()
    try:
        sub = await b.subscribe([_topic(b, "fmw")], _uid("g"), Collector())
        assert isinstance(sub, KafkaSubscription)
        assert sub._consumer._fetch_max_wait_ms == 250  # aiokafka's private attribute
        await sub.stop()
    finally:
        await b.stop()


# ---------------------------------------------------------------- throughput


async def _measure(bus: KafkaEventBus, total: int, batch: int, size: int) -> dict[str, float]:
    topic = _topic(bus, _uid("tput"))
    await bus.ensure_topics([topic])
    msgs = _msgs(topic, total, keys=1000, size=size)
    assert 280 <= len(msgs[0].value) <= 320
    cpu0, t0 = time.process_time(), time.perf_counter()
    for i in range(0, total, batch):
        await bus.publish(msgs[i : i + batch])
    pub_wall, pub_cpu = time.perf_counter() - t0, time.process_time() - cpu0

    count = 0
    finished = asyncio.Event()

    async def handler(batch_: Sequence[InboundMessage]) -> None:
        nonlocal count
        count += len(batch_)
        if count >= total:
            finished.set()

    sub = await bus.subscribe([topic], _uid("g"), handler, max_batch=batch)
    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.wait_for(finished.wait(), 60)
    con_wall, con_cpu = time.perf_counter() - t0, time.process_time() - cpu0
    await sub.stop()
    assert count == total
    return {
        "publish_msgs_per_s": total / pub_wall,
        "publish_cpu_us_per_msg": pub_cpu / total * 1e6,
        "consume_msgs_per_s": total / con_wall,
        "consume_cpu_us_per_msg": con_cpu / total * 1e6,
    }


@pytest.mark.kafka
async def test_throughput(bus: KafkaEventBus) -> None:
    result = await _measure(bus, total=20_000, batch=500, size=295)
    print("\nKafkaEventBus throughput (20,000 x ~300 B, batches of 500):")
    for name, value in result.items():
        print(f"  {name}: {value:,.1f}")
    assert result["publish_msgs_per_s"] > 2_000
    assert result["consume_msgs_per_s"] > 2_000


async def _main() -> None:  # pragma: no cover - run by hand: python tests/backends/test_kafka_bus.py
    b = KafkaEventBus(KAFKA, topic_prefix=_uid("t"))
    await b.start()
    try:
        print(await _measure(b, 20_000, 500, 295))
    finally:
        await b.stop()


if __name__ == "__main__":  # pragma: no cover
    asyncio.run(_main())


# ---------------------------------------------------------------- broker outage (own broker)

OUTAGE_PORT = int(os.environ.get("KAFKA_OUTAGE_PORT", "19392"))
SERVICES = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "services")


def _services(command: str) -> int:
    env = dict(os.environ, KAFKA_PORT=str(OUTAGE_PORT))
    return subprocess.run(
        [SERVICES, command, "kafka"], env=env, capture_output=True, text=True, timeout=180, check=False
    ).returncode


@pytest.mark.kafka
@pytest.mark.reliability
async def test_publish_and_subscription_survive_a_broker_crash() -> None:
    """On a private broker (KAFKA_OUTAGE_PORT, default 19392; never the shared one, nor the cluster's
    19092-19094): SIGKILL it while a publisher and a subscriber run, start it again, and check every
    acknowledged message arrives."""
    was_up = await asyncio.to_thread(_services, "status") == 0
    if not was_up:
        assert await asyncio.to_thread(_services, "up") == 0, "could not start the private broker"
    b = KafkaEventBus(f"127.0.0.1:{OUTAGE_PORT}", topic_prefix=_uid("t"), start_timeout=20)
    await b.start()
    try:
        topic = _topic(b, "outage")
        got = Collector()
        sub = await b.subscribe([topic], _uid("g"), got)
        acked: set[int] = set()
        failures = 0
        stop = asyncio.Event()

        async def publisher() -> None:
            nonlocal failures
            n = 0
            while not stop.is_set():
                try:
                    await b.publish(_msgs(topic, 10, start=n))
                    acked.update(range(n, n + 10))
                    n += 10
                except EventBusError:
                    failures += 1  # retried with the same ids: at-least-once
                await asyncio.sleep(0.05)

        task = asyncio.create_task(publisher())
        await asyncio.sleep(2)
        assert await asyncio.to_thread(_services, "kill") == 0
        await asyncio.sleep(3)
        assert await asyncio.to_thread(_services, "up") == 0
        await asyncio.sleep(3)
        stop.set()
        await task
        await got.wait_until(lambda: acked <= set(_ids(got.messages)), within=60)
        assert len(acked) > 100

        # With the broker dead, stopping still returns: every teardown step is bounded.
        b2 = KafkaEventBus(f"127.0.0.1:{OUTAGE_PORT}", topic_prefix=_uid("t"), start_timeout=3)
        await b2.start()
        await b2.subscribe([_topic(b2, "dead")], _uid("g"), Collector())
        await b2.publish(_msgs(_topic(b2, "dead"), 5))
        assert await asyncio.to_thread(_services, "kill") == 0
        t0 = time.monotonic()
        await asyncio.gather(sub.stop(), b2.stop())
        assert time.monotonic() - t0 < 20
    finally:
        await b.stop()
        if not was_up:
            await asyncio.to_thread(_services, "down")


@pytest.mark.kafka
async def test_consume_with_every_slot_taken_pauses_and_stays_in_the_group(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every slot taken for twice the max poll interval: the member pauses its partitions but keeps
    polling, so the group keeps it (no revocation), and it resumes when a slot frees."""
    _require_kafka()
    caplog.set_level("INFO", logger="orchestrator_kafka.slots")
    b = KafkaEventBus(
        KAFKA, topic_prefix=_uid("t"), partitions=2, start_timeout=20, max_poll_interval_ms=2000
    )
    await b.start()
    try:
        topic = _topic(b, "full")
        await b.publish(_msgs(topic, 6, keys=3))
        release = asyncio.Event()
        handled: list[int] = []

        async def handler(message: InboundMessage) -> None:
            await release.wait()
            handled.extend(_ids([message]))

        sub = await b.consume([topic], _uid("g"), handler, concurrency=2)
        await asyncio.sleep(4.5)  # more than twice max_poll_interval_ms with both slots taken
        assert handled == []
        assert "released partitions" not in caplog.text  # never revoked: still the group's member
        assert sub._consumer.paused()  # type: ignore[attr-defined]
        release.set()
        await _poll_until(lambda: sorted(handled) == list(range(6)), within=30)
        assert not sub._consumer.paused()  # type: ignore[attr-defined]
        await sub.stop()
    finally:
        await b.stop()


@pytest.mark.kafka
async def test_new_topics_are_served_before_ensure_topics_returns(
    bus: KafkaEventBus, caplog: pytest.LogCaptureFixture
) -> None:
    """A new group consuming topics created a moment ago resets its offsets at each partition's leader: a
    leader named in the metadata but not serving yet made aiokafka log NotLeaderForPartitionError at
    ERROR (seven lines per first start of the example's orchestrator, before ensure_topics waited)."""
    caplog.set_level("ERROR", logger="aiokafka")
    topics = [_topic(bus, f"fresh{i}") for i in range(16)]
    await bus.ensure_topics(topics)
    got = Collector()
    sub = await bus.subscribe(topics, _uid("g"), got)
    await bus.publish([OutboxMessage(t, "k", b"1|") for t in topics])
    await got.wait_for(len(topics))
    await sub.stop()
    assert "NotLeaderForPartition" not in caplog.text


async def test_an_idle_producer_does_not_linger(bus: KafkaEventBus) -> None:
    """The bus's producer is made with linger_ms=2 and told to send at once while idle: this breaks if
    aiokafka moves the private attribute the linger lives in (see aiokafka_workarounds.set_linger)."""
    topic = _topic(bus, "linger")
    await bus.ensure_topics([topic])
    sender = bus._producer._sender
    assert sender._linger_time == 0.002
    await bus.publish([OutboxMessage(topic, "k", b"v")])
    assert sender._linger_time == 0.0
