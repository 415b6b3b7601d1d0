"""KafkaEventBus without a broker: its settings, how it fails to start, what it refuses before it is
started, and its choice of partitions. The tests that need a running Kafka are in ``test_kafka_bus.py``."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence

import pytest
from aiokafka.partitioner import DefaultPartitioner

from orchestrator_kafka.backends.kafka import KafkaEventBus, publisher
from orchestrator_kafka.backends.kafka.admin import replication
from orchestrator_kafka.errors import EventBusError, ValidationError
from orchestrator_kafka.values import InboundMessage, OutboxMessage

from ..conftest import KAFKA, unique


def _one_message() -> list[OutboxMessage]:
    return [OutboxMessage("x", "k0", b"0|")]


async def test_unreachable_broker_raises_event_bus_error_quickly() -> None:
    b = KafkaEventBus("127.0.0.1:1", start_timeout=5)
    t0 = time.monotonic()
    with pytest.raises(EventBusError, match=r"127\.0\.0\.1:1"):
        await b.start()
    assert time.monotonic() - t0 < 5.5
    assert not b.started
    with pytest.raises(EventBusError, match="not started"):
        await b.publish(_one_message())
    await b.stop()  # nothing to stop, still fine


async def test_silent_broker_times_out_with_event_bus_error() -> None:
    # A listening socket that never answers: aiokafka alone would wait request_timeout_ms (40 s).
    writers: list[asyncio.StreamWriter] = []

    async def accept_and_say_nothing(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)

    server = await asyncio.start_server(accept_and_say_nothing, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        b = KafkaEventBus(f"127.0.0.1:{port}", start_timeout=1.0)
        t0 = time.monotonic()
        with pytest.raises(EventBusError, match=f"127.0.0.1:{port}.*no answer within 1s"):
            await b.start()
        assert time.monotonic() - t0 < 3
        assert not b.started
    finally:
        for w in writers:
            w.close()
        server.close()
        await server.wait_closed()


async def test_not_started_bus_refuses_everything() -> None:
    b = KafkaEventBus(KAFKA, topic_prefix=unique("t"))
    with pytest.raises(EventBusError):
        await b.publish(_one_message())
    with pytest.raises(EventBusError):
        await b.ensure_topics(["x"])

    async def handler(batch: Sequence[InboundMessage]) -> None:
        pass

    with pytest.raises(EventBusError):
        await b.subscribe(["x"], "g", handler)
    with pytest.raises(EventBusError):
        await b.publish([])


def test_settings_are_validated_and_env_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "h1:1,h2:2")
    assert KafkaEventBus().bootstrap_servers == "h1:1,h2:2"
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS")
    assert KafkaEventBus().bootstrap_servers == "localhost:9092"
    assert KafkaEventBus(topic_prefix="p").topic_prefix == "p"
    with pytest.raises(ValidationError):
        KafkaEventBus(security_protocol="SSL")
    with pytest.raises(ValidationError):
        KafkaEventBus(security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN")
    with pytest.raises(ValidationError):
        KafkaEventBus(security_protocol="bogus")
    with pytest.raises(ValidationError):
        KafkaEventBus(partitions=0)
    assert KafkaEventBus().fetch_max_wait_ms == 100
    assert KafkaEventBus(fetch_max_wait_ms=0).fetch_max_wait_ms == 0
    with pytest.raises(ValidationError, match="fetch_max_wait_ms"):
        KafkaEventBus(fetch_max_wait_ms=-1)
    KafkaEventBus(
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_plain_username="u",
        sasl_plain_password="p",
    )


def test_replication_is_min_of_three_and_the_brokers_with_two_in_sync_from_three_replicas() -> None:
    # The default: as many copies as there are brokers, up to three.
    assert replication(None, 1) == (1, {})
    assert replication(None, 2) == (2, {})
    assert replication(None, 3) == (3, {"min.insync.replicas": "2"})
    assert replication(None, 7) == (3, {"min.insync.replicas": "2"})
    # A given factor wins; min.insync.replicas=2 only where a broker can be lost and 2 remain.
    assert replication(1, 5) == (1, {})
    assert replication(2, 5) == (2, {})
    assert replication(5, 5) == (5, {"min.insync.replicas": "2"})
    assert replication(None, 0) == (1, {})  # no broker listed yet: Kafka refuses with a clear error
    assert KafkaEventBus().replication_factor is None
    assert KafkaEventBus(replication_factor=2).replication_factor == 2
    with pytest.raises(ValidationError, match="replication_factor"):
        KafkaEventBus(replication_factor=0)


async def test_the_producer_waits_for_every_in_sync_replica() -> None:
    # acks=all (-1) with min.insync.replicas=2: an acknowledged message is on two brokers at least.
    producer = KafkaEventBus("127.0.0.1:1")._make_producer()
    try:
        assert producer._sender._acks == -1
    finally:
        await producer.stop()


# Kafka's own murmur2 test vectors (org.apache.kafka.common.utils.UtilsTest.testMurmur2): signed 32-bit.
JAVA_MURMUR2 = {
    "21": -973932308,
    "foobar": -790332482,
    "a-little-bit-long-string": -985981536,
    "a-little-bit-longer-string": -1486304829,
    "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    "abc": 479470107,
}


def test_partition_choice_is_the_java_clients_and_aiokafkas() -> None:
    for n in (1, 2, 3, 4, 7, 12):
        partitions = tuple(range(n))
        plan = publisher._TopicPlan(partitions, list(partitions), {})
        # The Java client: Utils.toPositive(Utils.murmur2(keyBytes)) % numPartitions.
        for key, h in JAVA_MURMUR2.items():
            assert plan.choose(key) == (h & 0x7FFFFFFF) % n
        for i in range(300):
            key = str(uuid.UUID(int=i * 104729 + n))
            expected = DefaultPartitioner()(key.encode(), list(partitions), list(partitions))
            assert plan.choose(key) == expected
            assert plan.cache[key] == expected


def test_partition_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(publisher, "_PARTITION_CACHE_SIZE", 10)
    cache: dict[str, int] = {}
    plan = publisher._TopicPlan((0, 1, 2, 3), [0, 1, 2, 3], cache)
    for i in range(25):
        plan.choose(f"k{i}")
        assert 1 <= len(cache) <= 10


def test_the_producer_lingers_only_while_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    """A producer made with linger_ms=2 sends at once while fewer than BUSY_MESSAGES a window are published,
    lingers again once a window is busy, and stops lingering after an idle gap."""

    class Sender:
        _linger_time = 0.002

    class Producer:
        _sender = Sender()

    now = [100.0]
    monkeypatch.setattr(publisher.time, "monotonic", lambda: now[0])
    p = publisher.Publisher(lambda: None, timeout=1.0, lifecycle=asyncio.Lock(), linger=0.002)
    producer = Producer()
    window = publisher.LOAD_WINDOW * 1.01  # a window and a bit: float sums must not fall short

    p._adapt_linger(producer, 1)  # the first window ended long ago, with nothing in it: idle
    assert producer._sender._linger_time == 0.0
    now[0] += window
    p._adapt_linger(producer, publisher.BUSY_MESSAGES)  # the window of 1 message ends: still idle
    assert producer._sender._linger_time == 0.0
    now[0] += window
    p._adapt_linger(producer, 1)  # the window that just ended was busy
    assert producer._sender._linger_time == 0.002
    now[0] += 10 * window
    p._adapt_linger(producer, 1)  # a busy count, but in a window that ended long ago: idle
    assert producer._sender._linger_time == 0.0
    fresh = Producer()
    fresh._sender = Sender()
    now[0] += window
    p._adapt_linger(fresh, 1)  # a new producer (made with the bus's linger) is told too
    assert fresh._sender._linger_time == 0.0
