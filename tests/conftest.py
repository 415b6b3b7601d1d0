"""Shared fixtures: the backends every behaviour test runs on.

``memory`` is the in-process backend. ``real`` is Apache Kafka and Redis at ``KAFKA_BOOTSTRAP_SERVERS``
and ``REDIS_URL`` (``scripts/services up`` starts both on loopback; ``scripts/test`` does it for you).
With neither variable set, nothing listening and a Docker engine at hand, testcontainers starts them.
A real-backend test whose service is not there FAILS, with the reason: it is never skipped. To run
only the in-memory tests: ``pytest -m "not kafka and not redis"``.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import re
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import pytest

from orchestrator_kafka import InMemoryEventBus, InMemoryStateStore
from orchestrator_kafka.constants import DEDUPE_TTL_SECONDS
from orchestrator_kafka.ports import IEventBus, IStateStore

from .redis_cluster import Cluster, private_cluster, shared_cluster

if TYPE_CHECKING:
    from orchestrator_kafka import RedisStateStore

KAFKA = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
REDIS = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


_from_containers: dict[str, str] = {}


def _container(service: str) -> str | None:
    """Where a user has a Docker engine and no local service, start one with testcontainers, once per
    session. Here there is no Docker engine: scripts/services runs both on loopback instead."""
    if service in _from_containers:
        return _from_containers[service]
    try:
        subprocess.run(["docker", "info"], capture_output=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    if service == "kafka":
        from testcontainers.community.kafka import KafkaContainer

        kafka = KafkaContainer().with_kraft()
        kafka.start()
        atexit.register(kafka.stop)
        address = kafka.get_bootstrap_server()
    else:
        from testcontainers.community.redis import RedisContainer

        redis = RedisContainer()
        redis.start()
        atexit.register(redis.stop)
        address = f"redis://{redis.get_container_host_ip()}:{redis.get_exposed_port(6379)}/0"
    _from_containers[service] = address
    return address


def require_kafka() -> str:
    host, _, port = KAFKA.split(",")[0].rpartition(":")
    if _reachable(host or "127.0.0.1", int(port)):
        return KAFKA
    started = None if "KAFKA_BOOTSTRAP_SERVERS" in os.environ else _container("kafka")
    if started is None:
        pytest.fail(f"Kafka is not reachable at {KAFKA}: run 'scripts/services up' (or 'scripts/test')")
    return started


def require_redis() -> str:
    url = urlparse(REDIS)
    if _reachable(url.hostname or "127.0.0.1", url.port or 6379):
        return REDIS
    started = None if "REDIS_URL" in os.environ else _container("redis")
    if started is None:
        pytest.fail(f"Redis is not reachable at {REDIS}: run 'scripts/services up' (or 'scripts/test')")
    return started


# Every name unique() gave out in this session: the session-end cleanup deletes only their topics, so
# two pytest sessions on one broker (a developer's and CI's, or two shells) never delete each other's
# topics mid-test.
_made: set[str] = set()


def unique(prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    _made.add(name)
    return name


@dataclass
class Backend:
    """Makes event buses and a state store that share one world, and closes them all at the end."""

    name: str
    make_bus: Callable[[], IEventBus]
    store: IStateStore
    buses: list[IEventBus] = field(default_factory=list)
    cleanup: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    def bus(self) -> IEventBus:
        bus = self.make_bus()
        self.buses.append(bus)
        return bus

    async def close(self) -> None:
        for bus in self.buses:
            await bus.stop()
        await self.store.close()
        for step in self.cleanup:
            await step()


def memory_backend() -> Backend:
    broker = InMemoryEventBus(partitions=4, redelivery_delay=0.01)
    return Backend("memory", lambda: InMemoryEventBus.sharing(broker), InMemoryStateStore())


def real_backend() -> Backend:
    from orchestrator_kafka import KafkaEventBus

    bootstrap = require_kafka()
    topic_prefix = unique("t")
    stores = RedisStores(require_redis())
    backend = Backend(
        "kafka+redis",
        lambda: KafkaEventBus(bootstrap, topic_prefix=topic_prefix, partitions=2),
        stores(partitions=None),  # the orchestrator records the topics' count at start
    )
    backend.cleanup.append(stores.close)
    return backend


class RedisStores:
    """Makes RedisStateStores on the test Redis under one key prefix of their own (so tests can share
    the server); :meth:`close` closes them and deletes every key under the prefix."""

    def __init__(self, url: str, *, cluster: bool = False) -> None:
        self.url = url
        self.cluster = cluster  # a Redis Cluster: its keys are scanned and deleted node by node
        self.prefix = unique("k")
        self._made: list[RedisStateStore] = []

    def __call__(
        self, *, dedupe_ttl: int = DEDUPE_TTL_SECONDS, url: str | None = None, **kwargs: Any
    ) -> RedisStateStore:
        """A store under the prefix, on 4 partitions unless told, on the stores' Redis unless ``url``
        names its start-up nodes otherwise; ``kwargs`` go to RedisStateStore (a ``client``, say)."""
        from orchestrator_kafka import RedisStateStore

        kwargs.setdefault("partitions", 4)
        made = RedisStateStore(url or self.url, key_prefix=self.prefix, dedupe_ttl=dedupe_ttl, **kwargs)
        self._made.append(made)
        return made

    async def _each_key(self, do: Callable[[Any, bytes], Awaitable[object]]) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.cluster import RedisCluster

        client: Any = (
            RedisCluster.from_url(self.url.split(",")[0]) if self.cluster else aioredis.from_url(self.url)
        )
        try:
            async for key in client.scan_iter(match=f"{self.prefix}:*", count=1000):
                await do(client, key)
        finally:
            await client.aclose()

    async def pass_time(self, seconds: float) -> None:
        """Let ``seconds`` pass for the stores' keys: key expiry is the only clock a Redis store
        has (its timers take the time as an argument), so take ``seconds`` off every key's TTL."""
        gone = round(seconds * 1000)

        async def age(client: Any, key: bytes) -> None:
            left = await client.pttl(key)
            if left >= 0:  # -1: the key never expires
                await client.pexpire(key, left - gone) if left > gone else await client.delete(key)

        await self._each_key(age)

    async def close(self) -> None:
        for made in self._made:
            await made.close()
        await self._each_key(lambda client, key: client.delete(key))


@pytest.fixture
async def redis_stores() -> AsyncIterator[RedisStores]:
    """Makes Redis stores under a key prefix of their own, and cleans up after them."""
    stores = RedisStores(require_redis())
    try:
        yield stores
    finally:
        await stores.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[Cluster]:
    """A Redis Cluster: the one ``CLUSTER_REDIS_URL`` names, else six redis-servers of this session's
    own (tests/redis_cluster.py)."""
    shared = shared_cluster()
    if shared is not None:
        yield shared
        return
    with private_cluster() as made:
        yield made


@pytest.fixture(scope="session")
def faulty_cluster(redis_cluster: Cluster) -> Iterator[Cluster]:
    """A Redis Cluster whose nodes a test may stop and kill: always a private one (never a shared
    cluster), healthy again after each test that hurt it."""
    if redis_cluster.private:
        yield redis_cluster
        return
    with private_cluster() as made:
        yield made


@pytest.fixture
async def cluster_stores(redis_cluster: Cluster) -> AsyncIterator[RedisStores]:
    """Makes Redis stores on the Redis Cluster under a key prefix of their own, and cleans up after
    them."""
    stores = RedisStores(redis_cluster.url, cluster=True)
    try:
        yield stores
    finally:
        await stores.close()


@pytest.fixture(
    params=[
        pytest.param("memory"),
        pytest.param("kafka+redis", marks=[pytest.mark.kafka, pytest.mark.redis]),
    ]
)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """Every behaviour test runs once in memory and once on real Kafka and Redis."""
    made = memory_backend() if request.param == "memory" else real_backend()
    try:
        yield made
    finally:
        await made.close()


@pytest.fixture(autouse=True)
async def dump_tasks_when_stuck(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """A test still running after 90 s prints every asyncio task's stack, so a hang in CI says where."""

    async def watchdog() -> None:
        await asyncio.sleep(90)
        print(f"\n--- {request.node.nodeid} still running after 90 s; asyncio tasks:", file=sys.stderr)
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                task.print_stack(limit=12, file=sys.stderr)

    dog = asyncio.get_running_loop().create_task(watchdog())
    try:
        yield
    finally:
        dog.cancel()


# Topics the tests make: a prefix from unique() ("t-", "c-", "topic-" and ten hex digits).
_TEST_TOPIC = re.compile(r"^(t|c|topic)-[0-9a-f]{10}(\.|$)")


@pytest.fixture(scope="session", autouse=True)
def delete_test_topics() -> Iterator[None]:
    """Delete the session's topics at its end, so a long-lived broker does not pile up thousands; only
    this session's (named by unique()), never those of another session running on the same broker."""
    yield
    delete_session_topics(KAFKA)


def delete_session_topics(bootstrap: str) -> None:
    """Delete, on the brokers at ``bootstrap`` (when reachable), the topics this session made."""
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    if not _reachable(host or "127.0.0.1", int(port)):
        return

    async def delete() -> None:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            doomed = [
                t for t in await admin.list_topics() if _TEST_TOPIC.match(t) and t.split(".", 1)[0] in _made
            ]
            for i in range(0, len(doomed), 200):
                await admin.delete_topics(doomed[i : i + 200])
        finally:
            await admin.close()

    asyncio.run(delete())
