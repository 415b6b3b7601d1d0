"""An orchestrator on a Redis that fills up (issue 12, item 6; DESIGN section 10): it commits nothing it
could not write, says so (log, metric, /readyz), loses no saga, and carries on by itself once Redis has
room. Kafka is the shared test broker; Redis is a private redis-server with a small ``maxmemory``."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiokafka.admin import AIOKafkaAdminClient
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from orchestrator_kafka import (
    ConfigurationError,
    EventBusError,
    InMemoryEventBus,
    KafkaEventBus,
    Orchestrator,
    SagaClient,
    StepContext,
    Worker,
    WorkflowBuilder,
    WorkflowExecutionError,
)
from orchestrator_kafka import orchestrator as orchestrator_module
from orchestrator_kafka.backends.redis import RedisStateStore
from orchestrator_kafka.constants import ORCHESTRATOR_GROUP
from orchestrator_kafka.service import serve
from orchestrator_kafka.telemetry import Telemetry

from ..conftest import require_kafka, unique
from ..private_redis import cmd, fill, free, private_redis

pytestmark = [pytest.mark.kafka, pytest.mark.redis]
ROOT = Path(__file__).resolve().parents[2]

WORKFLOW = WorkflowBuilder("wf").add_step("a", "wa").add_step("b", "wb").build()


@pytest.fixture
def url() -> Iterator[str]:
    with private_redis() as address:
        yield address


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _readyz(port: int) -> tuple[int, str]:
    def get() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError as exc:
            return 0, str(exc)

    return await asyncio.to_thread(get)


async def _until(what: str, check: Any, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)
    del what  # named for the reader of a timeout's traceback


async def _committed(admin: AIOKafkaAdminClient, group: str) -> dict[tuple[str, int], int]:
    offsets = await admin.list_consumer_group_offsets(group)
    return {(tp.topic, tp.partition): meta.offset for tp, meta in offsets.items()}


async def test_on_a_full_redis_nothing_is_committed_or_lost_and_every_saga_completes_once_it_has_room(
    url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    bootstrap = require_kafka()
    prefix = unique("t")
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    monkeypatch.setattr(orchestrator_module, "Telemetry", functools.partial(Telemetry, meter_provider=meters))
    caplog.set_level(logging.WARNING, logger="orchestrator_kafka.orchestrator")

    def bus() -> KafkaEventBus:
        return KafkaEventBus(bootstrap, topic_prefix=prefix, partitions=2)

    store = RedisStateStore(url)
    orchestrator_bus = bus()
    orchestrator = Orchestrator(WORKFLOW, orchestrator_bus, store, timer_interval=0.05)
    gate = asyncio.Event()

    async def step_b(ctx: StepContext) -> dict[str, Any]:
        await gate.wait()  # the first sagas are mid-way when Redis fills up
        return {"b": ctx.transaction_id}

    worker_bus = bus()
    worker = Worker(worker_bus)
    worker.register("wa", lambda ctx: {"a": ctx.transaction_id})
    worker.register("wb", step_b)
    client_bus = bus()
    client = SagaClient(client_bus, store)
    port, stop = _free_port(), asyncio.Event()
    group = orchestrator.topics.group(ORCHESTRATOR_GROUP)
    thresholds = gc.get_threshold()  # serve() tunes the collector for the whole process
    serving = asyncio.create_task(
        serve(orchestrator, closers=[orchestrator_bus.stop], health=("127.0.0.1", port), stop=stop)
    )
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        await admin.start()
        await _until("ready", lambda: _ready(port))
        await worker.start()
        await client_bus.start()
        early = [await client.start_saga("wf", {"n": i}) for i in range(3)]

        async def waiting_on_b() -> bool:
            sagas = await store.load_contexts(early)
            return len(sagas) == 3 and all(s.current_step == "b" for s in sagas.values())

        await _until("the first sagas wait on step b", waiting_on_b)
        before = {tx: s.version for tx, s in (await store.load_contexts(early)).items()}
        committed = await _settled(admin, group)

        await fill(url)
        gate.set()  # their results come back to a full Redis
        late = [await client.start_saga("wf", {"n": i}) for i in range(3, 8)]
        with pytest.raises(WorkflowExecutionError, match="could not record"):
            await orchestrator.execute_workflow("wf", {})  # a request is refused to its caller

        async def unready() -> bool:
            status, _ = await _readyz(port)
            return status == 503

        await _until("/readyz says it", unready)
        status, body = await _readyz(port)
        assert status == 503 and "not ready: the state store has refused writes" in body, body
        await asyncio.sleep(2.0)  # several redeliveries, with their backoff
        # Nothing written, nothing committed: the results and starts wait on Kafka.
        assert {tx: s.version for tx, s in (await store.load_contexts(early)).items()} == before
        assert await store.load_contexts(late) == {}
        assert await _committed(admin, group) == committed
        refused = _count(reader, "saga.store.refused_writes")
        assert refused >= 2, refused
        said = [r.getMessage() for r in caplog.records if "refuses writes" in r.getMessage()]
        assert len(said) == 1, said  # once per interval (30 s), not once per retry

        await free(url)
        everyone = early + late

        async def all_completed() -> bool:
            sagas = await store.load_contexts(everyone)
            return len(sagas) == len(everyone) and all(s.state.value == "completed" for s in sagas.values())

        await _until("every saga completes", all_completed)
        for saga in (await store.load_contexts(everyone)).values():
            assert saga.step_results["b"] == {"b": saga.transaction_id}
        assert await _readyz(port) == (200, "ready")
        assert any("accepts writes again" in r.getMessage() for r in caplog.records)
        await _until("offsets committed past the refused ones", lambda: _moved(admin, group, committed))
    finally:
        stop.set()
        gate.set()
        await serving
        await worker.stop()
        await worker_bus.stop()
        await client_bus.stop()
        await admin.close()
        await store.close()
        meters.shutdown()
        gc.set_threshold(*thresholds)


async def _ready(port: int) -> bool:
    return (await _readyz(port))[0] == 200


async def _settled(admin: AIOKafkaAdminClient, group: str) -> dict[tuple[str, int], int]:
    """The group's committed offsets once they stand still, on both topics it consumes (starts and
    results): a batch's commit lands a little after its writes."""
    last: dict[tuple[str, int], int] = {}
    async with asyncio.timeout(30):
        while True:
            now = await _committed(admin, group)
            if now == last and len({topic for topic, _ in now}) == 2:
                return now
            last = now
            await asyncio.sleep(0.5)


async def _moved(admin: AIOKafkaAdminClient, group: str, before: dict[tuple[str, int], int]) -> bool:
    now = await _committed(admin, group)
    return all(now.get(tp, -1) >= offset for tp, offset in before.items()) and now != before


def _count(reader: InMemoryMetricReader, name: str) -> float:
    data = reader.get_metrics_data()
    assert data is not None
    return sum(
        point.value
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == name
        for point in metric.data.data_points
    )


async def test_the_orchestrator_refuses_to_start_on_an_evicting_redis(url: str) -> None:
    raw = aioredis.Redis.from_url(url)
    try:
        await cmd(raw, "CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
    finally:
        await raw.aclose()
    store, bus = RedisStateStore(url), InMemoryEventBus()
    try:
        orchestrator = Orchestrator(WORKFLOW, bus, store)
        with pytest.raises(ConfigurationError, match=r"'allkeys-lru'.*evict"):
            await orchestrator.start()
        with pytest.raises(EventBusError, match="not started"):
            await bus.publish([])  # refused before anything ran: the bus was not even started
        with pytest.raises(WorkflowExecutionError, match="not started"):
            await orchestrator.execute_workflow("wf", {})
    finally:
        await store.close()


async def test_the_run_command_exits_with_one_line_naming_an_evicting_policy(url: str) -> None:
    raw = aioredis.Redis.from_url(url)
    try:
        await cmd(raw, "CONFIG", "SET", "maxmemory-policy", "volatile-lru")
    finally:
        await raw.aclose()
    env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=require_kafka(), ORCHESTRATOR_TOPIC_PREFIX=unique("t"))
    command = ["-m", "orchestrator_kafka", "--redis-url", url, "run", "--workflows", "tests.cli.app"]
    run = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, *command],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "maxmemory-policy 'volatile-lru'" in run.stderr and "noeviction" in run.stderr
