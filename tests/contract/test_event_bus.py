"""The IEventBus contract, run against every implementation alike."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence

import pytest

from orchestrator_kafka import EventBusError, InMemoryEventBus
from orchestrator_kafka.ports import IEventBus, InboundMessage, OutboxMessage

from ..conftest import require_kafka, unique

BusFactory = Callable[[], IEventBus]


class Collector:
    def __init__(self, fail_times: int = 0) -> None:
        self.batches: list[list[InboundMessage]] = []
        self.fail_times = fail_times

    async def __call__(self, batch: Sequence[InboundMessage]) -> None:
        if self.fail_times > 0:
            self.fail_times -= 1
            raise RuntimeError("handler failed")
        self.batches.append(list(batch))

    @property
    def messages(self) -> list[InboundMessage]:
        return [m for b in self.batches for m in b]

    async def wait(self, count: int, timeout: float = 30.0) -> list[InboundMessage]:
        async def poll() -> None:
            while len(self.messages) < count:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(poll(), timeout)
        return self.messages


async def until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)


async def resumes_after_what_was_committed(bus: IEventBus, topic: str, group: str) -> None:
    """A new member of ``group`` gets only a message published now: everything before was committed."""
    await bus.publish([OutboxMessage(topic, "k", b"new")])
    later = Collector()
    await bus.subscribe([topic], group, later)
    assert [m.value for m in await later.wait(1)] == [b"new"]
    await asyncio.sleep(0.5)
    assert [m.value for m in later.messages] == [b"new"]


async def five_messages(make_bus: BusFactory, topic: str) -> tuple[IEventBus, str]:
    """A started bus, five messages "0".."4" of one key on ``topic``, and a new group's name."""
    bus = make_bus()
    await bus.start()
    await bus.publish([OutboxMessage(topic, "k", str(i).encode()) for i in range(5)])
    return bus, unique("g")


class EventBusContract:
    """Subclasses provide ``make_bus``: a factory of started buses that share one broker."""

    @pytest.fixture
    def topic(self) -> str:
        return unique("topic")

    async def test_messages_arrive_with_keys_headers_and_per_key_order(
        self, make_bus: BusFactory, topic: str
    ) -> None:
        bus = make_bus()
        await bus.start()
        await bus.ensure_topics([topic])
        messages = [
            OutboxMessage(
                topic, f"key-{i % 3}", f"value-{i}".encode(), (("n", str(i).encode()), ("bin", b"\xff"))
            )
            for i in range(30)
        ]
        await bus.publish(messages)
        got = Collector()
        await bus.subscribe([topic], unique("g"), got)  # a new group starts from the earliest offset
        received = await got.wait(30)
        assert sorted(m.value or b"" for m in received) == sorted(m.value for m in messages)
        for m in received:
            headers = dict(m.headers)
            assert headers["bin"] == b"\xff"
            assert m.key == f"key-{int(headers['n']) % 3}".encode()
        for key in ("key-0", "key-1", "key-2"):
            in_order = [int(dict(m.headers)["n"]) for m in received if m.key == key.encode()]
            assert in_order == sorted(in_order)
            assert len({m.partition for m in received if m.key == key.encode()}) == 1

    async def test_a_watch_sees_what_is_published_after_it_starts_and_ends_with_its_bus(
        self, make_bus: BusFactory, topic: str
    ) -> None:
        watcher, producer = make_bus(), make_bus()
        await watcher.start()
        await producer.start()
        await producer.ensure_topics([topic])
        await producer.publish([OutboxMessage(topic, f"k{i}", b"before") for i in range(8)])
        seen: list[InboundMessage] = []
        first = await watcher.watch(topic, seen.extend)
        second: list[InboundMessage] = []
        await watcher.watch(topic, second.extend)  # each watch sees every message: no group
        await producer.publish([OutboxMessage(topic, f"k{i}", f"after-{i}".encode()) for i in range(8)])
        await until(lambda: len(seen) >= 8 and len(second) >= 8)
        await asyncio.sleep(0.3)
        assert sorted(m.value or b"" for m in seen) == sorted(f"after-{i}".encode() for i in range(8))
        assert sorted(m.value or b"" for m in second) == sorted(m.value or b"" for m in seen)
        await watcher.stop()
        await asyncio.wait_for(first.ended(), 10)  # ended with its bus
        with pytest.raises(EventBusError):
            await make_bus().watch(topic, seen.extend)  # not started

    async def test_subscribe_returns_ready_so_nothing_published_after_is_missed(
        self, make_bus: BusFactory, topic: str
    ) -> None:
        consumer_bus, producer_bus = make_bus(), make_bus()
        await consumer_bus.start()
        await producer_bus.start()
        got = Collector()
        await consumer_bus.subscribe([topic], unique("g"), got)
        await producer_bus.publish([OutboxMessage(topic, "k", b"after")])
        assert [m.value for m in await got.wait(1)] == [b"after"]

    async def test_batches_respect_max_batch(self, make_bus: BusFactory, topic: str) -> None:
        bus = make_bus()
        await bus.start()
        await bus.publish([OutboxMessage(topic, "same-key", str(i).encode()) for i in range(50)])
        got = Collector()
        await bus.subscribe([topic], unique("g"), got, max_batch=7)
        await got.wait(50)
        assert max(len(b) for b in got.batches) <= 7
        assert [int(m.value or b"") for m in got.messages] == list(range(50))

    async def test_a_failing_handler_gets_the_batch_again_and_offsets_follow_success(
        self, make_bus: BusFactory, topic: str
    ) -> None:
        bus, group = await five_messages(make_bus, topic)
        flaky = Collector(fail_times=2)
        subscription = await bus.subscribe([topic], group, flaky)
        assert [int(m.value or b"") for m in await flaky.wait(5)] == list(range(5))
        await subscription.stop()
        await subscription.stop()  # idempotent
        # A new member of the same group resumes after what was handled: no repeats, nothing lost.
        await resumes_after_what_was_committed(bus, topic, group)

    async def test_a_batch_is_committed_once_its_completion_finishes_and_redelivered_when_it_fails(
        self, make_bus: BusFactory, topic: str
    ) -> None:
        bus, group = await five_messages(make_bus, topic)
        seen: list[bytes] = []
        failures = [2]  # the first two completions fail

        async def handler(batch: Sequence[InboundMessage]) -> asyncio.Task[None]:
            values = [m.value or b"" for m in batch]

            async def complete() -> None:
                await asyncio.sleep(0.05)
                if failures[0] > 0:
                    failures[0] -= 1
                    raise RuntimeError("completion failed")
                seen.extend(values)

            return asyncio.create_task(complete())

        subscription = await bus.subscribe([topic], group, handler)

        async def all_seen() -> None:
            while sorted(set(seen)) != [str(i).encode() for i in range(5)]:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(all_seen(), 30)
        assert failures == [0]
        await subscription.stop()
        # Everything whose completion finished was committed: a new member of the group starts after it.
        await resumes_after_what_was_committed(bus, topic, group)

    async def test_stop_waits_for_the_completion_in_flight(self, make_bus: BusFactory, topic: str) -> None:
        bus = make_bus()
        await bus.start()
        group = unique("g")
        await bus.publish([OutboxMessage(topic, "k", b"0")])
        started, finished = asyncio.Event(), asyncio.Event()

        async def handler(batch: Sequence[InboundMessage]) -> asyncio.Task[None]:
            async def complete() -> None:
                await asyncio.sleep(0.3)
                finished.set()

            started.set()
            return asyncio.create_task(complete())

        subscription = await bus.subscribe([topic], group, handler)
        await asyncio.wait_for(started.wait(), 30)
        await subscription.stop()
        assert finished.is_set()
        # ... and committed the batch before leaving: the group does not get it again.
        await resumes_after_what_was_committed(bus, topic, group)

    async def test_every_group_gets_every_message(self, make_bus: BusFactory, topic: str) -> None:
        bus = make_bus()
        await bus.start()
        a, b = Collector(), Collector()
        await bus.subscribe([topic], unique("g"), a)
        await bus.subscribe([topic], unique("g"), b)
        await bus.publish([OutboxMessage(topic, str(i), b"x") for i in range(10)])
        assert len(await a.wait(10)) == 10
        assert len(await b.wait(10)) == 10

    async def test_members_of_one_group_share_the_partitions(self, make_bus: BusFactory, topic: str) -> None:
        bus_a, bus_b = make_bus(), make_bus()
        await bus_a.start()
        await bus_b.start()
        group = unique("g")
        a, b = Collector(), Collector()
        await bus_a.subscribe([topic], group, a)
        await bus_b.subscribe([topic], group, b)
        await bus_a.publish([OutboxMessage(topic, f"key-{i}", str(i).encode()) for i in range(40)])

        async def all_in() -> None:
            while len(a.messages) + len(b.messages) < 40:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(all_in(), 60)
        values = sorted(int(m.value or b"") for m in a.messages + b.messages)
        assert values == list(range(40))  # each once, across the members

    async def test_consume_runs_each_message_in_a_slot_and_commits_only_what_finished(
        self, make_bus: BusFactory, topic: str
    ) -> None:
        """One key, so one partition: message 0 blocks, and the nine behind it are handled meanwhile.
        Stopped, the group commits up to 0 with 1-9 marked done: a new member runs only 0 again."""
        bus, group = make_bus(), unique("g")
        await bus.start()
        await bus.publish([OutboxMessage(topic, "k", str(i).encode()) for i in range(10)])
        release = asyncio.Event()
        handled: list[int] = []
        cancelled: list[int] = []

        async def handler(message: InboundMessage) -> None:
            n = int(message.value or b"")
            if n == 0:
                try:
                    await release.wait()
                except asyncio.CancelledError:
                    cancelled.append(n)
                    raise
            handled.append(n)

        first = await bus.consume([topic], group, handler, concurrency=4, grace=0.2)
        await until(lambda: sorted(handled) == list(range(1, 10)))  # all behind the blocked one
        await first.stop()  # 0 outlives the grace: cancelled, left to be delivered again
        assert cancelled == [0] and 0 not in handled
        handled.clear()
        release.set()
        again = await bus.consume([topic], group, handler, concurrency=4)
        await until(lambda: handled == [0])
        await bus.publish([OutboxMessage(topic, "k", b"10")])
        await until(lambda: handled == [0, 10])  # and nothing of 1-9 ran again
        await again.stop()

    async def test_consume_never_runs_more_than_its_slots_and_retries_a_handler_that_raised(
        self, make_bus: BusFactory, topic: str
    ) -> None:
        bus, group = make_bus(), unique("g")
        await bus.start()
        await bus.publish([OutboxMessage(topic, f"k{i % 3}", str(i).encode()) for i in range(30)])
        running = peak = 0
        failed_once: set[int] = set()
        handled: set[int] = set()

        async def handler(message: InboundMessage) -> None:
            nonlocal running, peak
            n = int(message.value or b"")
            running += 1
            peak = max(peak, running)
            try:
                await asyncio.sleep(0.01)
                if n % 7 == 0 and n not in failed_once:
                    failed_once.add(n)
                    raise RuntimeError("a blip")
                handled.add(n)
            finally:
                running -= 1

        sub = await bus.consume([topic], group, handler, concurrency=3)
        await until(lambda: handled == set(range(30)))
        assert peak == 3  # the slots were used, and never one more
        assert failed_once == {0, 7, 14, 21, 28}
        await sub.stop()
        await resumes_after_what_was_committed(bus, topic, group)

    async def test_read_gives_every_message_without_a_group_and_follow_gives_new_ones(
        self, make_bus: BusFactory, topic: str
    ) -> None:
        bus = make_bus()
        await bus.start()
        await bus.ensure_topics([topic])
        await bus.publish([OutboxMessage(topic, f"k{i}", str(i).encode(), (("n", b"1"),)) for i in range(20)])
        read = [m async for m in bus.read(topic)]  # ends at the end the topic had
        assert sorted(int(m.value or b"") for m in read) == list(range(20))
        assert all(dict(m.headers)["n"] == b"1" for m in read)
        # Read again: the same messages (the order across partitions may differ), nothing consumed.
        where = sorted((m.partition, m.offset) for m in read)
        assert sorted([(m.partition, m.offset) async for m in bus.read(topic)]) == where

        async def follow(count: int) -> list[int]:
            got: list[int] = []
            async with contextlib.aclosing(bus.read(topic, follow=True)) as stream:
                async for m in stream:
                    got.append(int(m.value or b""))
                    if len(got) == count:
                        return got
            raise AssertionError("the stream ended")

        following = asyncio.create_task(follow(25))
        await asyncio.sleep(0.5)
        assert not following.done()  # waiting for more, past the 20 kept
        await bus.publish([OutboxMessage(topic, "k", str(20 + i).encode()) for i in range(5)])
        assert sorted(await asyncio.wait_for(following, 30)) == list(range(25))
        with pytest.raises(EventBusError, match="no topic"):
            [m async for m in bus.read(unique("missing"))]

    async def test_use_before_start_is_a_clear_error(self, make_bus: BusFactory, topic: str) -> None:
        bus = make_bus()
        with pytest.raises(EventBusError, match="start"):
            await bus.publish([OutboxMessage(topic, "k", b"v")])
        await bus.stop()  # stopping a bus that never started is fine
        await bus.start()
        await bus.start()  # idempotent
        await bus.stop()
        await bus.stop()

    async def test_async_with_starts_and_stops_the_bus(self, make_bus: BusFactory, topic: str) -> None:
        bus = make_bus()
        async with bus as entered:
            assert entered is bus
            await bus.publish([OutboxMessage(topic, "k", b"v")])
        with pytest.raises(EventBusError, match="start"):
            await bus.publish([OutboxMessage(topic, "k", b"v")])


class TestInMemoryEventBus(EventBusContract):
    @pytest.fixture
    async def make_bus(self) -> AsyncIterator[BusFactory]:
        # One in-process broker; each "bus" is a handle on it, as Kafka clients are.
        shared = InMemoryEventBus(partitions=4, redelivery_delay=0.01)
        made: list[InMemoryEventBus] = []

        def make() -> IEventBus:
            handle = InMemoryEventBus.sharing(shared)
            made.append(handle)
            return handle

        yield make
        for bus in made:
            await bus.stop()


@pytest.mark.kafka
class TestKafkaEventBus(EventBusContract):
    @pytest.fixture
    async def make_bus(self) -> AsyncIterator[BusFactory]:
        from orchestrator_kafka import KafkaEventBus

        bootstrap = require_kafka()
        made: list[IEventBus] = []

        def make() -> IEventBus:
            bus = KafkaEventBus(bootstrap, topic_prefix=unique("c"), partitions=4)
            made.append(bus)
            return bus

        yield make
        for bus in made:
            await bus.stop()

    async def test_the_next_batch_is_handed_over_while_a_completion_runs_and_commits_stay_in_order(
        self, make_bus: BusFactory
    ) -> None:
        """Pipelining: batch 2 reaches the handler before batch 1's completion finishes. Batch 1's
        completion then fails: batch 2's succeeded, but it is not committed past batch 1, and both come
        again."""
        bus = make_bus()
        await bus.start()
        topic, group = unique("topic"), unique("g")
        await bus.ensure_topics([topic])
        release = asyncio.Event()
        calls: list[list[bytes]] = []

        async def handler(batch: Sequence[InboundMessage]) -> asyncio.Task[None]:
            values = [m.value or b"" for m in batch]
            calls.append(values)
            first_try = len(calls) == 1

            async def complete() -> None:
                if first_try:
                    await release.wait()
                    raise RuntimeError("the first batch's completion fails")

            return asyncio.create_task(complete())

        await bus.subscribe([topic], group, handler)
        await bus.publish([OutboxMessage(topic, "k", b"a")])

        async def calls_at_least(n: int) -> None:
            while len(calls) < n:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(calls_at_least(1), 30)
        await bus.publish([OutboxMessage(topic, "k", b"b")])
        await asyncio.wait_for(calls_at_least(2), 30)  # handed over while batch 1's completion waits
        assert calls[:2] == [[b"a"], [b"b"]]
        release.set()
        await asyncio.wait_for(calls_at_least(3), 30)
        assert calls[2][0] == b"a"  # redelivered from the failed batch, batch 2 included
        await asyncio.wait_for(calls_at_least(3 if len(calls[2]) == 2 else 4), 30)
        assert [v for c in calls[2:] for v in c] == [b"a", b"b"]
