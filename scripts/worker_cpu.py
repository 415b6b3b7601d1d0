"""The worker's CPU per command, without Kafka: N step commands (a trivial async handler, concurrency
1000) through the in-memory bus; prints the process's CPU time per command. For A/B runs of the worker's
hot path, alternated; pin it to one core (``taskset -c 1``) when the machine is busy.

    .venv/bin/python scripts/worker_cpu.py [N]
"""

from __future__ import annotations

import asyncio
import gc
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from orchestrator_kafka import InMemoryEventBus, StepContext, Worker
from orchestrator_kafka.constants import Topics
from orchestrator_kafka.models import command_payload
from orchestrator_kafka.values import InboundMessage, OutboxMessage


async def main(n: int) -> None:
    bus = InMemoryEventBus()
    await bus.start()
    topics = Topics(bus.topic_prefix)
    worker = Worker(bus, concurrency=1000)

    async def handle(ctx: StepContext) -> dict[str, Any]:
        return {"ok": ctx.attempt}

    worker.register("w1", handle)
    answered = 0
    done = asyncio.Event()

    async def results(batch: Sequence[InboundMessage]) -> None:
        nonlocal answered
        answered += len(batch)
        if answered >= n:
            done.set()

    await bus.ensure_topics([topics.results, *topics.of_worker("w1")])
    subscription = await bus.subscribe([topics.results], "worker-cpu.results", results)
    await worker.start()
    now = datetime.now(UTC)
    commands = []
    for i in range(n):
        tx = f"tx-{i}"
        payload = command_payload(
            tx, "wf", now, f"{tx}:s1:execute:1", "s1", "w1", "execute", 1, {"n": i}, None
        )
        commands.append(
            OutboxMessage(topics.commands("w1"), tx, orjson.dumps(payload, option=orjson.OPT_UTC_Z))
        )
    gc.collect()
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(0, n, 1000):
        await bus.publish(commands[i : i + 1000])
    await done.wait()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    print(f"{n} commands: {cpu / n * 1e6:.1f} us of CPU per command, {n / wall:,.0f} commands/s")
    await worker.stop()
    await subscription.stop()
    await bus.stop()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000))
