"""Broker and Redis restarts under load, on a private Kafka and a private Redis (other ports, started and
stopped here through scripts/services) so the rest of the suite is not disturbed. The orchestrator and the
workers reconnect by themselves and finish every saga; while Redis is down, no offset is committed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from aiokafka.admin import AIOKafkaAdminClient

from ..conftest import require_kafka, require_redis
from .harness import ROOT, World
from .test_crash import cancel_holds, mix

pytestmark = [pytest.mark.reliability, pytest.mark.kafka, pytest.mark.redis]


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive loopback ports free now (Kafka takes its port and the next,
    for its controller), so that test suites running side by side on one machine do not collide. Drawn
    below the kernel's ephemeral range (32768 up here), which the suite's own client connections take
    their local ports from: one could take a port between this check and the server's bind."""
    for _ in range(200):
        first = random.randrange(20000, 32000 - count)
        try:
            with contextlib.ExitStack() as held:
                for port in range(first, first + count):
                    taken = held.enter_context(socket.socket())
                    taken.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
    raise AssertionError(f"no {count} consecutive free ports")


_BASE = free_ports(3)  # Kafka, its controller, Redis
KAFKA_PORT = int(os.environ.get("REL_KAFKA_PORT") or _BASE)
REDIS_PORT = int(os.environ.get("REL_REDIS_PORT") or _BASE + 2)


def services(command: str, which: str) -> None:
    env = dict(
        os.environ,
        KAFKA_PORT=str(KAFKA_PORT),
        REDIS_PORT=str(REDIS_PORT),
        KAFKA_HEAP_OPTS="-Xmx512m -Xms128m",
        SERVICES_STOP_TIMEOUT="20",
    )
    done = subprocess.run(
        [str(ROOT / "scripts" / "services"), command, which],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, f"services {command} {which}: {done.stdout}{done.stderr}"


@pytest.fixture(scope="module")
def private_kafka() -> Iterator[str]:
    services("up", "kafka")
    try:
        yield f"127.0.0.1:{KAFKA_PORT}"
    finally:
        services("clean", "kafka")  # a port of its own each run: leave no data behind


@pytest.fixture(scope="module")
def private_redis() -> Iterator[str]:
    services("up", "redis")
    try:
        yield f"redis://127.0.0.1:{REDIS_PORT}/0"
    finally:
        services("clean", "redis")


@pytest.fixture
async def kafka_world(private_kafka: str, tmp_path: Path) -> AsyncIterator[World]:
    made = World(private_kafka, require_redis(), require_redis(), tmp_path)
    try:
        yield made
    finally:
        await made.close()


@pytest.fixture
async def redis_world(private_redis: str, tmp_path: Path) -> AsyncIterator[World]:
    made = World(require_kafka(), private_redis, require_redis(), tmp_path)
    try:
        yield made
    finally:
        await made.close()


@pytest.mark.timeout(420)
async def test_the_broker_restarting_and_crashing_under_load(kafka_world: World) -> None:
    world = kafka_world
    await world.up(orchestrators=1, workers=1)
    ids = await world.submit(mix(300))
    await cancel_holds(world, ids)
    await asyncio.to_thread(services, "restart", "kafka")  # an orderly restart
    more = await world.submit(mix(100))
    await world.wait_progress(more, at_least=20)
    await asyncio.to_thread(services, "kill", "kafka")  # a crash
    await asyncio.sleep(3)
    await asyncio.to_thread(services, "up", "kafka")
    report = await world.verify([*ids, *more])
    assert sum(report.states.values()) == 400
    assert all(p.alive() for p in world.procs), world.tails()


async def committed(world: World) -> dict[tuple[str, int], int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=world.bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(f"{world.prefix}.orchestrator")
    finally:
        await admin.close()
    return {(tp.topic, tp.partition): meta.offset for tp, meta in offsets.items()}


@pytest.mark.timeout(420)
async def test_redis_restarting_and_crashing_under_load_commits_nothing_while_down(
    redis_world: World,
) -> None:
    world = redis_world
    await world.up(orchestrators=1, workers=1)
    ids = await world.submit(mix(300))
    await cancel_holds(world, ids)

    await asyncio.to_thread(services, "down", "redis")  # orderly: the AOF is complete
    await asyncio.sleep(1)  # batches in hand when it went down settle (fail, not commit)
    before = await committed(world)
    more = await world.submit(mix(100))  # arrives while Redis is down
    await asyncio.sleep(5)
    assert await committed(world) == before  # nothing is committed while Redis is down
    await asyncio.to_thread(services, "up", "redis")
    await world.wait_progress(more, at_least=50, timeout=90)

    # A crash: with the shipped appendfsync always, which makes every acknowledged write durable, a
    # SIGKILL loses nothing either.
    admin = aioredis.from_url(world.redis_url)
    assert await admin.config_get("appendfsync") == {"appendfsync": "always"}
    await admin.aclose()
    await asyncio.to_thread(services, "kill", "redis")
    await asyncio.sleep(3)
    await asyncio.to_thread(services, "up", "redis")
    report = await world.verify([*ids, *more])
    assert sum(report.states.values()) == 400
    assert all(p.alive() for p in world.procs), world.tails()
