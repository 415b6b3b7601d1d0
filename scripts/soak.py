"""The soak: sagas at a fixed rate for a long time, with a short retention, on a Redis of its own; every
few seconds it samples Redis ``used_memory``, its key count, and the orchestrator's and worker's RSS.
After the first retention window each figure must stay flat (within +-10% of its mean), and it says so.

usage: scripts/bench --soak SECONDS [--rate N] [--retention S] [--every S] [--partitions N]

It also reports the bytes Redis holds per retained saga and Redis CPU per saga step. The roles are those of
scripts/bench.py (the orchestrator and the worker, each its own process); the driver starts sagas and reads
the audit topic for completions.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime

import orjson

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import STEPS, Child, cpu_seconds, create_topics, driver_clients, drop

LIMIT = 0.10  # flat: every sample after the first retention window within 10% of their mean


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PrivateRedis:
    """A redis-server of the soak's own on a free loopback port: no other keys, its own CPU count. AOF as
    the shipped redis.conf has it, fsync every second (the soak is about memory, not durability)."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="soak-redis-")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                shutil.which("redis-server") or "redis-server",
                "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
                "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
                "--maxmemory-policy", "noeviction",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.url = f"redis://127.0.0.1:{self.port}/0"

    async def wait(self) -> None:
        import redis.asyncio as aioredis

        client = aioredis.from_url(self.url)
        for _ in range(200):
            try:
                await client.ping()
                break
            except (OSError, aioredis.ConnectionError):
                await asyncio.sleep(0.05)
        await client.aclose()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


async def soak(args: argparse.Namespace) -> int:
    server = PrivateRedis()
    try:
        await server.wait()
        return await _soak(args, server)
    finally:
        server.stop()


async def _soak(args: argparse.Namespace, server: PrivateRedis) -> int:
    import redis.asyncio as aioredis

    from orchestrator_kafka.codec import encode
    from orchestrator_kafka.models import StartBody, StartSaga

    r = aioredis.from_url(server.url)
    prefix = f"soak-{uuid.uuid4().hex[:8]}"
    await create_topics([f"{prefix}.{t}" for t in ("start", "results", "events", "dlq")], args.partitions)
    # --retention 0: the store's default (to measure a soak without the short window).
    env = {"BENCH_REDIS_URL": server.url, "BENCH_RETENTION": str(args.retention or "")}
    orchestrator = Child("orchestrator", prefix, args.partitions, env)
    worker = Child("worker", prefix, args.partitions)
    producer, consumer = await driver_clients([f"{prefix}.events"], f"{prefix}.driver", linger_ms=2)
    empty = int((await r.info("memory"))["used_memory"])
    sent = completed = 0
    started = time.monotonic()
    redis_cpu0 = cpu_seconds(server.proc.pid)

    async def drive() -> None:
        nonlocal sent
        tick = 0.05
        while (elapsed := time.monotonic() - started) < args.seconds:
            due = int(elapsed * args.rate) - sent
            futures = []
            for _ in range(max(0, due)):
                tx = f"{prefix}-{sent}"
                start = StartSaga(
                    event_id=str(uuid.uuid4()),
                    transaction_id=tx,
                    workflow_id="bench",
                    occurred_at=datetime.now(UTC),
                    body=StartBody(context={"n": sent}),
                )
                futures.append(await producer.send(f"{prefix}.start", encode(start), key=tx.encode()))
                sent += 1
            if futures:
                await asyncio.gather(*futures)
            await asyncio.sleep(tick)

    async def read() -> None:
        nonlocal completed
        while True:
            batches = await consumer.getmany(timeout_ms=200, max_records=5000)
            for records in batches.values():
                for record in records:
                    actions = orjson.loads(record.value)["body"]["actions"]
                    completed += sum(a["action"] == "saga_completed" for a in actions)

    reader = asyncio.create_task(read())
    driver = asyncio.create_task(drive())
    rows: list[tuple[float, int, int, float, float, int, int]] = []
    print(f"# soak: {args.rate} sagas/s for {args.seconds}s, retention {args.retention}s, Redis {server.url}")
    print(
        f"{'t s':>6} {'used_memory':>12} {'keys':>8} {'orch MB':>8} {'worker MB':>9} {'sent':>8} {'done':>8}"
    )
    while not driver.done() or time.monotonic() - started < args.seconds:
        await asyncio.sleep(args.every)
        row = (
            time.monotonic() - started,
            int((await r.info("memory"))["used_memory"]),
            int(await r.dbsize()),
            rss_mb(orchestrator.proc.pid),
            rss_mb(worker.proc.pid),
            sent,
            completed,
        )
        rows.append(row)
        print(
            f"{row[0]:6.0f} {row[1]:12,} {row[2]:8,} {row[3]:8.1f} {row[4]:9.1f} {row[5]:8,} {row[6]:8,}",
            flush=True,
        )
    await driver
    redis_cpu = cpu_seconds(server.proc.pid) - redis_cpu0
    reader.cancel()
    # Flat: from one retention window (plus a sample, for the first expiries) after the start.
    steady = [row for row in rows if row[0] >= args.retention + 2 * args.every]
    verdicts = []
    for name, column in (("used_memory", 1), ("keys", 2), ("orchestrator RSS", 3), ("worker RSS", 4)):
        values = [row[column] for row in steady]
        if not values:
            continue
        mean = sum(values) / len(values)
        spread = max(abs(v - mean) for v in values) / mean if mean else 0.0
        verdicts.append(spread <= LIMIT)
        print(
            f"# {name}: mean {mean:,.1f}, every sample within {spread:.1%} of it: "
            + ("flat" if spread <= LIMIT else "NOT flat")
        )
    if steady and args.retention:
        retained = args.rate * args.retention
        held = sum(row[1] for row in steady) / len(steady) - empty
        print(
            f"# bytes per retained saga: {held / retained:,.0f} "
            f"(used_memory above the empty server / {retained:,} sagas)"
        )
    steps = completed * STEPS
    if steps:
        print(f"# Redis CPU per saga step: {redis_cpu / steps * 1e3:.3f} ms ({steps:,} steps)")
    print(f"# completed {completed:,} of {sent:,} sagas started")
    await consumer.stop()
    await producer.stop()
    orchestrator.stop()
    worker.stop()
    await r.aclose()
    await drop(prefix)
    return 0 if verdicts and all(verdicts) else 1


if __name__ == "__main__":
    # A SIGTERM unwinds like Ctrl-C: the private Redis and the roles are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--soak", dest="seconds", type=float, required=True, metavar="SECONDS")
    parser.add_argument("--rate", type=int, default=200, help="sagas started a second")
    parser.add_argument("--retention", type=int, default=30, help="seconds a finished saga is kept")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--partitions", type=int, default=4)
    sys.exit(asyncio.run(soak(parser.parse_args())))
