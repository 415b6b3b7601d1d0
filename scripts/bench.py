"""The benchmark: orchestrated sagas against the raw Kafka round trip, on the same broker, in one run.

(a) raw echo: a driver keeps N messages in flight to ``<p>.ping``; an echo process consumes them in
    batches and produces each back to ``<p>.pong``; the driver consumes the pongs. No orchestrator, no
    Redis: the practical limit of a Kafka round trip from Python here.
(b) sagas: the driver publishes start requests (3-step sagas) to the start topic, keeping N sagas in
    flight; an orchestrator process (KafkaEventBus + RedisStateStore) and a worker process run them;
    the driver tails the audit topic for completions and step latencies.

(c) floor: (b) with the orchestrator replaced by a stand-in that makes the same messages and does nothing
    else: it parses each event with orjson and publishes the next command and the audit record in
    batches through the same KafkaEventBus, pipelined like the orchestrator. No state machine, no
    validation, no Redis. It is what any orchestrator on this bus, this broker and these cores could do
    at best, so it shows how much of the gap to (a) is the orchestrator's and how much is the traffic
    a step makes (a command, a result and an audit record, against the echo's two messages).

Each orchestrated step is one command out and one result back, the same Kafka round trip as (a)
plus the Redis write and the audit event, so the ratio (b) steps/s / (a) round trips/s at the same
number in flight says what the orchestrator costs. Roles run as separate processes, as in production.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

BOOTSTRAP = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
# scripts/bench --cluster (scripts/cluster_bench.py): the three-broker Kafka and the Redis Cluster of
# `scripts/services up --cluster`; the run's topics get this replication factor.
CLUSTER = os.environ.get("BENCH_CLUSTER") == "1"
REPLICATION = int(os.environ.get("BENCH_REPLICATION", "1"))
PAYLOAD = b"x" * 200
STEPS = 3
STALL_SECONDS = 30.0
# Sagas per unit of in-flight level below 50 in flight (see main).
LOW_LEVEL_SAGAS = 300
# Each run's topics and keys are deleted at the end: deleting them between runs loads the broker.
USED_PREFIXES: list[str] = []


def workflow() -> Any:
    from orchestrator_kafka import WorkflowBuilder

    builder = WorkflowBuilder("bench")
    # The worker case (--slow-step-ms): every step on one worker name, so one pool of slots serves all.
    one = os.environ.get("BENCH_ONE_WORKER") == "1"
    for i in range(1, STEPS + 1):
        builder.add_step(f"s{i}", "w1" if one else f"w{i}", compensation=f"u{i}")
    return builder.build()


# ---------------------------------------------------------------- roles (child processes)


async def role_orchestrator(prefix: str, partitions: int) -> None:
    from orchestrator_kafka import KafkaEventBus, Orchestrator, RedisStateStore

    bus = KafkaEventBus(BOOTSTRAP, topic_prefix=prefix, partitions=partitions)
    # The soak (scripts/soak.py) runs its own Redis and a short retention.
    retention = os.environ.get("BENCH_RETENTION")
    kept = {"retention": int(retention), "failed_retention": int(retention)} if retention else {}
    store = RedisStateStore(os.environ.get("BENCH_REDIS_URL", REDIS_URL), key_prefix=prefix, **kept)
    async with Orchestrator(workflow(), bus, store):
        await ready_and_wait()
    await bus.stop()
    await store.close()


async def role_worker(prefix: str, partitions: int) -> None:
    from orchestrator_kafka import KafkaEventBus, StepContext, Worker

    bus = KafkaEventBus(BOOTSTRAP, topic_prefix=prefix, partitions=partitions)
    # The worker case (--slow-step-ms) sets both: each handler awaits a slow call, as a real one does.
    step_seconds = float(os.environ.get("BENCH_STEP_MS", "0")) / 1e3
    worker = Worker(bus, concurrency=int(os.environ.get("BENCH_CONCURRENCY", "1000")))

    async def handle(ctx: StepContext) -> dict[str, Any]:
        if step_seconds:
            await asyncio.sleep(step_seconds)
        return {ctx.step: ctx.attempt}

    for i in range(1, STEPS + 1):
        if os.environ.get("BENCH_ONE_WORKER") != "1" or i == 1:
            worker.register(f"w{i}", handle)
        worker.register(f"u{i}", handle)
    async with worker:
        await ready_and_wait()
    await bus.stop()


async def role_floor(prefix: str, partitions: int) -> None:
    """(c): the orchestrator's messages for the bench workflow, and nothing else (see the docstring)."""
    from orchestrator_kafka import KafkaEventBus
    from orchestrator_kafka.ports import InboundMessage, OutboxMessage

    bus = KafkaEventBus(BOOTSTRAP, topic_prefix=prefix, partitions=partitions)
    await bus.start()
    versions: dict[str, int] = {}
    previous: list[asyncio.Task[None]] = []

    def action(name: str, step: str | None = None, worker: str | None = None) -> dict[str, Any]:
        attempt, kind = (1, "execute") if step else (None, None)
        return {
            "action": name,
            "state": "running",
            "step": step,
            "worker_name": worker,
            "kind": kind,
            "attempt": attempt,
            "error": None,
        }

    def envelope(tx: str, event_type: str, now: datetime, body: dict[str, Any]) -> bytes:
        message = {
            "schema_version": "1.0",
            "event_id": str(uuid.uuid4()),
            "transaction_id": tx,
            "workflow_id": "bench",
            "occurred_at": now,
            "event_type": event_type,
            "body": body,
        }
        return orjson.dumps(message, option=orjson.OPT_UTC_Z)

    async def handle(batch: list[InboundMessage]) -> asyncio.Task[None]:
        now = datetime.now(UTC)
        out: list[OutboxMessage] = []
        for record in batch:
            event = orjson.loads(record.value or b"{}")
            tx = event["transaction_id"]
            version = versions[tx] = versions.get(tx, 0) + 1
            if event["event_type"] == "saga.start":
                step, data = 1, event["body"]["context"]
                actions = [action("saga_created"), action("saga_started")]
            else:
                body = event["body"]
                step, data = int(body["step"][1:]) + 1, body["result"]
                actions = [action("step_succeeded", body["step"])]
            if step <= STEPS:
                command = {
                    "command_id": f"{tx}:s{step}:execute:1",
                    "step": f"s{step}",
                    "worker_name": f"w{step}",
                    "kind": "execute",
                    "attempt": 1,
                    "data": data,
                    "timeout": None,
                }
                topic = f"{prefix}.commands.w{step}"
                out.append(OutboxMessage(topic, tx, envelope(tx, "step.command", now, command)))
                actions.append(action("step_dispatched", f"s{step}", f"w{step}"))
            else:
                actions.append(action("saga_completed"))
            audit = {"from_state": "running", "to_state": "running", "version": version, "actions": actions}
            out.append(OutboxMessage(f"{prefix}.events", tx, envelope(tx, "saga.transition", now, audit)))
        before = previous.pop() if previous else None

        async def complete() -> None:
            if before is not None:
                await before  # in order, as the orchestrator publishes
            await bus.publish(out)

        task = asyncio.get_running_loop().create_task(complete())
        previous.append(task)
        return task

    subscription = await bus.subscribe([f"{prefix}.start", f"{prefix}.results"], f"{prefix}.floor", handle)
    await ready_and_wait()
    await subscription.stop()
    await bus.stop()


async def role_echo(prefix: str, partitions: int) -> None:
    await create_topics([f"{prefix}.ping", f"{prefix}.pong"], partitions)
    producer = AIOKafkaProducer(
        bootstrap_servers=BOOTSTRAP,
        enable_idempotence=True,
        acks="all",
        linger_ms=int(os.environ.get("BENCH_LINGER_MS", "2")),
    )
    consumer = AIOKafkaConsumer(
        f"{prefix}.ping",
        bootstrap_servers=BOOTSTRAP,
        group_id=f"{prefix}.echo",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await producer.start()
    await consumer.start()
    await wait_assigned(consumer)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    while not stop.is_set():
        batches = await consumer.getmany(timeout_ms=100, max_records=500)
        futures = [
            await producer.send(f"{prefix}.pong", r.value, key=r.key)
            for records in batches.values()
            for r in records
        ]
        if futures:
            await asyncio.gather(*futures)
            await consumer.commit()
    await consumer.stop()
    await producer.stop()


async def ready_and_wait() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()


# ---------------------------------------------------------------- helpers


async def create_topics(topics: list[str], partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [NewTopic(t, partitions, REPLICATION) for t in topics if t not in existing]
        if new:
            await admin.create_topics(new)
    finally:
        await admin.close()


async def drop(prefix: str) -> None:
    """Delete a run's topics and Redis keys, so repeated runs do not pile them up on the broker."""
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        doomed = [t for t in await admin.list_topics() if t.startswith(f"{prefix}.")]
        if doomed:
            await admin.delete_topics(doomed)
    finally:
        await admin.close()
    import redis.asyncio as aioredis
    from redis.asyncio.cluster import RedisCluster

    # On a cluster, SCAN goes to every primary and a pipeline splits the deletes by node.
    client = RedisCluster.from_url(REDIS_URL) if CLUSTER else aioredis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
        for i in range(0, len(keys), 1000):
            pipe = client.pipeline()
            for key in keys[i : i + 1000]:
                pipe.delete(key)
            await pipe.execute()
    finally:
        await client.aclose()


async def driver_clients(
    topics: list[str], group: str, **producer_options: Any
) -> tuple[AIOKafkaProducer, AIOKafkaConsumer]:
    """The driver's producer (``acks=all``) and its consumer of ``topics`` from the earliest, both started,
    the consumer assigned."""
    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, acks="all", **producer_options)
    consumer = AIOKafkaConsumer(
        *topics, bootstrap_servers=BOOTSTRAP, group_id=group, auto_offset_reset="earliest"
    )
    await producer.start()
    await consumer.start()
    await wait_assigned(consumer)
    return producer, consumer


async def wait_assigned(consumer: AIOKafkaConsumer) -> None:
    while not consumer.assignment():
        await consumer.getmany(timeout_ms=100)


CHILDREN: list[subprocess.Popen[str]] = []


def kill_children() -> None:
    for proc in CHILDREN:
        if proc.poll() is None:
            proc.kill()


atexit.register(kill_children)


class Child:
    """A role in a child process; ready once it prints 'ready'. Killed when the driver exits."""

    def __init__(self, role: str, prefix: str, partitions: int, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--role", role, "--prefix", prefix, "--partitions", str(partitions)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        CHILDREN.append(self.proc)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"{role} did not start: {line!r}")
        self.cpu_start = cpu_seconds(self.proc.pid)

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid) - self.cpu_start

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def service_pids() -> dict[str, list[int]]:
    """The brokers' and Redis servers' pids, from scripts/services' pidfiles, to count their CPU too: one
    of each, or on a cluster (``--cluster``) every node's."""
    home = os.environ.get("ORCHESTRATOR_KAFKA_HOME", os.path.expanduser("~/.cache/orchestrator-kafka"))
    if CLUSTER:
        run = f"{home}/run/cluster"
        names = os.listdir(run) if os.path.isdir(run) else []
        pidfiles = [(n.split("-")[0], f"{run}/{n}/{n.split('-')[0]}.pid") for n in sorted(names) if "-" in n]
    else:
        kafka_port = BOOTSTRAP.split(",")[0].rsplit(":", 1)[1]
        redis_port = REDIS_URL.rsplit(":", 1)[1].split("/")[0]
        pidfiles = [
            ("kafka", f"{home}/run/kafka-{kafka_port}/kafka.pid"),
            ("redis", f"{home}/run/redis-{redis_port}/redis.pid"),
        ]
    found: dict[str, list[int]] = {}
    for name, pidfile in pidfiles:
        try:
            with open(pidfile) as f:
                pid = int(f.read().strip())
            cpu_seconds(pid)  # still running
        except (OSError, ValueError):
            continue
        found.setdefault(name, []).append(pid)
    return found


class ServiceCpu:
    def __init__(self) -> None:
        self.pids = service_pids()
        self.start = {name: self._cpu(pids) for name, pids in self.pids.items()}

    @staticmethod
    def _cpu(pids: list[int]) -> float:
        return sum(cpu_seconds(pid) for pid in pids)

    def used(self) -> dict[str, float]:
        return {name: self._cpu(pids) - self.start[name] for name, pids in self.pids.items()}


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


@dataclass
class Result:
    name: str
    inflight: int
    units: int
    seconds: float
    p50_ms: float
    p99_ms: float
    cpu: dict[str, float]
    saga_p50_ms: float = float("nan")
    saga_p99_ms: float = float("nan")
    hops: dict[str, float] | None = None

    @property
    def rate(self) -> float:
        return self.units / self.seconds


# ---------------------------------------------------------------- the two measurements


async def run_echo(total: int, inflight: int, partitions: int) -> Result:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    # As the bus does: linger only under load (a plain aiokafka producer cannot adapt, so it is chosen
    # by the level).
    linger_ms = 0 if inflight < 50 else 2
    echo = Child("echo", prefix, partitions, {"BENCH_LINGER_MS": str(linger_ms)})
    producer, consumer = await driver_clients(
        [f"{prefix}.pong"], f"{prefix}.driver", enable_idempotence=True, linger_ms=linger_ms
    )
    latencies: list[float] = []
    sent = received = 0
    services = ServiceCpu()
    driver_cpu = time.process_time()
    started = time.perf_counter()

    async def send(n: int) -> None:
        nonlocal sent
        futures = []
        for _ in range(n):
            value = orjson.dumps({"t": time.perf_counter(), "p": PAYLOAD.decode()})
            futures.append(await producer.send(f"{prefix}.ping", value, key=str(sent).encode()))
            sent += 1
        await asyncio.gather(*futures)

    await send(min(inflight, total))
    progress_at = time.perf_counter()
    while received < total:
        if time.perf_counter() - progress_at > STALL_SECONDS:
            raise RuntimeError(f"echo stalled: {received} of {sent} sent came back")
        batches = await consumer.getmany(timeout_ms=100, max_records=1000)
        now = time.perf_counter()
        got = 0
        for records in batches.values():
            for r in records:
                latencies.append(now - orjson.loads(r.value)["t"])
                got += 1
        received += got
        if got:
            progress_at = time.perf_counter()
        if got and sent < total:
            await send(min(got, total - sent))
    seconds = time.perf_counter() - started
    cpu = {"echo": echo.cpu(), "driver": time.process_time() - driver_cpu, **services.used()}
    await consumer.stop()
    await producer.stop()
    echo.stop()
    USED_PREFIXES.append(prefix)
    return Result(
        "raw echo", inflight, total, seconds, pct(latencies, 0.5) * 1e3, pct(latencies, 0.99) * 1e3, cpu
    )


async def run_sagas(
    total: int,
    inflight: int,
    partitions: int,
    role: str = "orchestrator",
    *,
    hops: bool = False,
    worker_env: dict[str, str] | None = None,
    name: str | None = None,
    orchestrators: int = 1,
) -> Result:
    """(b), or (c) with ``role="floor"``. ``hops``: also tail the results topic and split a saga's time
    into its hops (see :class:`Hops`). With several ``orchestrators`` (processes sharing the work), the
    CPU of each is counted apart, as ``<role>-<n>``."""
    from orchestrator_kafka.codec import encode
    from orchestrator_kafka.models import StartBody, StartSaga

    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    await create_topics([f"{prefix}.{t}" for t in ("start", "results", "events", "dlq")], partitions)
    deciders = [Child(role, prefix, partitions, worker_env) for _ in range(orchestrators)]
    worker = Child("worker", prefix, partitions, worker_env)
    tailed = [f"{prefix}.events", f"{prefix}.results"] if hops else [f"{prefix}.events"]
    producer, consumer = await driver_clients(tailed, f"{prefix}.driver", linger_ms=0)
    dispatched: dict[tuple[str, str], datetime] = {}
    begun_at: dict[str, datetime] = {}
    latencies: list[float] = []
    saga_latencies: list[float] = []
    hop = Hops()
    sent = completed = 0
    services = ServiceCpu()
    driver_cpu = time.process_time()
    started = time.perf_counter()

    async def start(n: int) -> None:
        nonlocal sent
        futures = []
        for _ in range(n):
            tx = f"{prefix}-{sent}"
            now = datetime.now(UTC)
            begun_at[tx] = now
            message = StartSaga(
                event_id=str(uuid.uuid4()),
                transaction_id=tx,
                workflow_id="bench",
                occurred_at=now,
                body=StartBody(context={"n": sent}),
            )
            futures.append(await producer.send(f"{prefix}.start", encode(message), key=tx.encode()))
            sent += 1
        await asyncio.gather(*futures)

    await start(min(inflight, total))
    progress_at = time.perf_counter()
    while completed < total:
        if time.perf_counter() - progress_at > STALL_SECONDS:
            raise RuntimeError(
                f"no saga completed for {STALL_SECONDS}s: {completed} of {sent} started are done"
            )
        batches = await consumer.getmany(timeout_ms=200, max_records=2000)
        seen = datetime.now(UTC)
        done = 0
        for records in batches.values():
            for r in records:
                event = orjson.loads(r.value)
                tx, at = event["transaction_id"], datetime.fromisoformat(event["occurred_at"])
                if event["event_type"] == "step.result":
                    hop.result_made(tx, event["body"]["step"], at)
                    continue
                for action in event["body"]["actions"]:
                    what = action["action"]
                    if what == "step_dispatched":
                        dispatched[(tx, action["step"])] = at
                        hop.dispatched(tx, action["step"], at)
                    elif what == "step_succeeded":
                        begun = dispatched.pop((tx, action["step"]), None)
                        if begun is not None:
                            latencies.append((at - begun).total_seconds())
                        hop.result_applied(tx, action["step"], at)
                    elif what == "saga_started":
                        hop.started(begun_at.get(tx), at)
                    elif what == "saga_completed":
                        done += 1
                        first = begun_at.pop(tx, None)
                        if first is not None:
                            saga_latencies.append((seen - first).total_seconds())
                        hop.completed(at, seen)
                    elif what in ("saga_compensated", "saga_failed"):
                        raise RuntimeError(f"a bench saga did not complete: {event}")
        completed += done
        if done:
            progress_at = time.perf_counter()
        if done and sent < total:
            await start(min(done, total - sent))
    seconds = time.perf_counter() - started
    cpu = {
        **{role if orchestrators == 1 else f"{role}-{i + 1}": d.cpu() for i, d in enumerate(deciders)},
        "worker": worker.cpu(),
        "driver": time.process_time() - driver_cpu,
        **services.used(),
    }
    await consumer.stop()
    await producer.stop()
    for decider in deciders:
        decider.stop()
    worker.stop()
    USED_PREFIXES.append(prefix)
    return Result(
        name or ("sagas" if role == "orchestrator" else role),
        inflight,
        total * STEPS,
        seconds,
        pct(latencies, 0.5) * 1e3,
        pct(latencies, 0.99) * 1e3,
        cpu,
        pct(saga_latencies, 0.5) * 1e3,
        pct(saga_latencies, 0.99) * 1e3,
        hop.medians() if hops else None,
    )


class Hops:
    """Where a saga's time goes, from the timestamps its messages carry (one clock: every process runs
    here). ``occurred_at`` of an audit record is when the orchestrator began the batch that made it, of
    a result when the worker made it, so each hop below also holds the work done at its start:

    - ``start``: the driver's start request sent -> the orchestrator's batch holding it began;
    - ``command``: the orchestrator's batch that dispatched a step began -> the worker made its result
      (the orchestrator's Redis write and publish, the broker, the worker's fetch and handler);
    - ``result``: the worker made the result -> the orchestrator's batch applying it began (the
      worker's publish, the broker, the orchestrator's fetch);
    - ``audit``: the orchestrator's batch that completed the saga began -> the driver read the record
      (the Redis write, the publish, the driver's fetch).
    """

    def __init__(self) -> None:
        self._samples: dict[str, list[float]] = {"start": [], "command": [], "result": [], "audit": []}
        self._dispatched: dict[tuple[str, str], datetime] = {}
        self._made: dict[tuple[str, str], datetime] = {}

    def started(self, sent: datetime | None, at: datetime) -> None:
        if sent is not None:
            self._samples["start"].append((at - sent).total_seconds())

    def dispatched(self, tx: str, step: str, at: datetime) -> None:
        self._dispatched[(tx, step)] = at

    def result_made(self, tx: str, step: str, at: datetime) -> None:
        self._made[(tx, step)] = at

    def result_applied(self, tx: str, step: str, at: datetime) -> None:
        out, made = self._dispatched.pop((tx, step), None), self._made.pop((tx, step), None)
        if out is not None and made is not None:
            self._samples["command"].append((made - out).total_seconds())
            self._samples["result"].append((at - made).total_seconds())

    def completed(self, at: datetime, seen: datetime) -> None:
        self._samples["audit"].append((seen - at).total_seconds())

    def medians(self) -> dict[str, float]:
        """Each hop's median, ms."""
        return {hop: pct(values, 0.5) * 1e3 for hop, values in self._samples.items()}


def report(r: Result, echo: Result | None) -> None:
    ratio = f"{r.rate / echo.rate:6.2f}" if echo is not None else "      "
    per_sagas = f"{r.rate / STEPS:9.0f}" if echo is not None else f"{'':>9}"
    cpu = ", ".join(f"{k} {v / r.units * 1e3:.3f}" for k, v in r.cpu.items())
    print(
        f"{r.name:<10} {r.inflight:>9} {r.rate:>10.0f} {per_sagas} {r.p50_ms:>8.1f} {r.p99_ms:>8.1f} "
        f"{r.saga_p50_ms:>8.1f} {r.saga_p99_ms:>8.1f} {ratio}  {cpu}",
        flush=True,
    )
    if r.hops is not None:
        print(f"{'':<10} {'':>9} hops, median ms: " + ", ".join(f"{k} {v:.2f}" for k, v in r.hops.items()))


async def main(args: argparse.Namespace) -> None:
    levels = [int(x) for x in args.inflight.split(",")]
    print(f"# orchestrator-kafka bench: Kafka {BOOTSTRAP}, Redis {REDIS_URL}, {os.cpu_count()} cores")
    print(
        f"# {args.sagas} sagas of {STEPS} steps per level (at most {LOW_LEVEL_SAGAS} a saga in flight "
        "below 50), and the raw echo of as many round trips as steps"
    )
    print(
        f"{'what':<10} {'in flight':>9} {'units/s':>10} {'sagas/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'saga p50':>8} {'saga p99':>8} {'ratio':>6}  cpu ms per unit"
    )
    await run_echo(2000, 200, args.partitions)  # warm-up: the broker's JIT and page cache, not reported
    best_echo = 0.0
    for level in levels:
        # Low levels are about latency: a few hundred sagas give steady medians without minutes of run.
        sagas = args.sagas if level >= 50 else min(args.sagas, LOW_LEVEL_SAGAS * level)
        echo = await run_echo(sagas * STEPS, level, args.partitions)
        orchestrated = await run_sagas(sagas, level, args.partitions, hops=level < 50)
        floor = await run_sagas(sagas, level, args.partitions, "floor", hops=level < 50)
        best_echo = max(best_echo, echo.rate)
        report(echo, None)
        report(orchestrated, echo)
        report(floor, echo)
    if args.slow_step_ms:
        # The worker case: every handler awaits a slow call; the bound is concurrency / step time.
        env = {
            "BENCH_STEP_MS": str(args.slow_step_ms),
            "BENCH_CONCURRENCY": str(args.slow_concurrency),
            "BENCH_ONE_WORKER": "1",
        }
        bound = args.slow_concurrency / (args.slow_step_ms / 1e3)
        slow = await run_sagas(
            args.sagas, 2 * args.slow_concurrency, args.partitions, worker_env=env, name="slow steps"
        )
        report(slow, None)
        print(
            f"# slow steps: each handler awaits {args.slow_step_ms:g} ms, one worker name of concurrency "
            f"{args.slow_concurrency}, {2 * args.slow_concurrency} sagas in flight: {slow.rate:.0f} steps/s "
            f"of the {bound:.0f} bound ({slow.rate / bound:.0%}); step p50 {slow.p50_ms:.1f} ms, "
            f"p99 {slow.p99_ms:.1f} ms"
        )
    print(
        "# units: round trips/s for raw echo, saga steps/s for sagas and floor; ratio = steps/s / echo, "
        "same level; p50/p99: one round trip, one step (dispatched -> succeeded); saga p50/p99: start "
        "request sent -> completion read; floor: the same messages with no orchestrator logic and no "
        "Redis (see --help)"
    )
    print(f"# best raw echo: {best_echo:.0f} round trips/s")
    for prefix in USED_PREFIXES:
        await drop(prefix)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--role", choices=["orchestrator", "worker", "echo", "floor"])
    parser.add_argument("--prefix", default="")
    parser.add_argument("--sagas", type=int, default=3000)
    parser.add_argument("--inflight", default="1,10,50,200,1000", help="comma-separated concurrency levels")
    parser.add_argument(
        "--slow-step-ms",
        type=float,
        default=100.0,
        help="the worker case: each handler awaits this long (0: skip the case)",
    )
    parser.add_argument("--slow-concurrency", type=int, default=200, help="the worker case's concurrency")
    parser.add_argument("--partitions", type=int, default=4)
    args = parser.parse_args()
    if args.role:
        from orchestrator_kafka.service import tune_gc

        tune_gc()  # as the CLI's run and worker commands do
        roles = {
            "orchestrator": role_orchestrator,
            "worker": role_worker,
            "echo": role_echo,
            "floor": role_floor,
        }
        role = roles[args.role]
        profile_dir = os.environ.get("BENCH_PROFILE")  # a folder: each role writes <role>.prof there
        if profile_dir:
            import cProfile

            with cProfile.Profile() as profiler:
                asyncio.run(role(args.prefix, args.partitions))
            profiler.dump_stats(os.path.join(profile_dir, f"{args.role}.prof"))
        else:
            asyncio.run(role(args.prefix, args.partitions))
    else:
        asyncio.run(main(args))
