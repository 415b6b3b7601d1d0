"""Bytes of Redis per finished saga: runs N sagas of the benchmark's 3-step workflow to completion (one
process: the in-memory bus with 4 partitions, the Redis state store), then sums ``MEMORY USAGE`` over every
key of the run's prefix and divides by N. Per-saga keys and shared keys (indexes, timers, outboxes) are
reported apart. Redis keeps a sorted set of up to 128 members as a compact listpack: with 4 partitions,
more than 512 sagas are needed for the indexes to take their size at scale.

    .venv/bin/python scripts/record_bytes.py [--sagas 1000]

Reads ``REDIS_URL`` (``eval "$(scripts/services env)"``); deletes its keys at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import uuid
from collections import Counter
from typing import Any

import redis.asyncio as aioredis

from orchestrator_kafka import (
    InMemoryEventBus,
    Orchestrator,
    RedisStateStore,
    StepContext,
    Worker,
    WorkflowBuilder,
)

STEPS = 3  # as scripts/bench.py
# A saga's own keys (RedisKeys in orchestrator_kafka/backends/redis/keys.py): the rest are a partition's.
_OWN = re.compile(rb":\{p\d+\}:(?:s|o|t|ev):")


async def measure(sagas: int) -> dict[str, Any]:
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    prefix = f"bytes-{uuid.uuid4().hex[:8]}"
    builder = WorkflowBuilder("bench")
    for i in range(1, STEPS + 1):
        builder.add_step(f"s{i}", f"w{i}", compensation=f"u{i}")
    bus, store = InMemoryEventBus(), RedisStateStore(url, key_prefix=prefix)
    worker = Worker(bus, concurrency=1000)

    async def handle(ctx: StepContext) -> dict[str, Any]:
        return {ctx.step: ctx.attempt}  # as the benchmark's worker

    for i in range(1, STEPS + 1):
        worker.register(f"w{i}", handle)
        worker.register(f"u{i}", handle)
    raw = aioredis.Redis.from_url(url)
    try:
        async with Orchestrator(builder.build(), bus, store), worker:
            for n in range(sagas):
                await store_start(bus, n, prefix)
            for _ in range(600):
                if len(await store.list_contexts("bench", "completed")) == sagas:
                    break
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError("the sagas did not complete in 60 s")
        per_kind: Counter[str] = Counter()
        total = 0
        async for key in raw.scan_iter(match=f"{prefix}:*", count=1000):
            used = int(await raw.memory_usage(key, samples=0) or 0)
            total += used
            per_kind["saga keys" if _OWN.search(key) else "shared keys"] += used
        shares = {kind: used / sagas for kind, used in per_kind.items()}
        return {"sagas": sagas, "bytes_per_saga": total / sagas, **shares}
    finally:
        keys = [key async for key in raw.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await raw.delete(*keys)
        await raw.aclose()
        await store.close()


async def store_start(bus: InMemoryEventBus, n: int, prefix: str) -> None:
    """Publish a start request as the benchmark's driver does (a random event id, a prefixed id)."""
    from orchestrator_kafka.client import SagaClient

    await SagaClient(bus).start_saga("bench", {"n": n}, transaction_id=f"{prefix}-{n}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sagas", type=int, default=1000)
    result = asyncio.run(measure(parser.parse_args().sagas))
    for name, value in result.items():
        print(f"{name:>16}: {value:,.0f}" if isinstance(value, float) else f"{name:>16}: {value}")


if __name__ == "__main__":
    main()
