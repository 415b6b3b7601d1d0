"""The orchestrator's hot path alone: CPU microseconds per saga step, without Kafka.

Drives N 3-step sagas straight through the batch handler (the start requests, then each step's
results, in batches of 500) with a real RedisStateStore on REDIS_URL and the in-memory bus, and prints
the process's CPU time per step. Redis's own CPU is not counted. Pin it to one core for A/B runs:

    eval "$(scripts/services env)"; taskset -c 1 .venv/bin/python scripts/hotpath.py 6000
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import time
import uuid
from datetime import UTC, datetime

from orchestrator_kafka import InMemoryEventBus, Orchestrator, RedisStateStore, WorkflowBuilder
from orchestrator_kafka.codec import encode
from orchestrator_kafka.models import ResultBody, StartBody, StartSaga, StepResult, command_id
from orchestrator_kafka.values import InboundMessage

BATCH = 500
STEPS = ("s1", "s2", "s3")


async def main(sagas: int) -> float:
    gc.set_threshold(100_000, 50, 100)  # as the run command does
    builder = WorkflowBuilder("bench")
    for i, step in enumerate(STEPS, 1):
        builder.add_step(step, f"w{i}", compensation=f"u{i}")
    prefix = "hotpath-" + uuid.uuid4().hex[:8]
    # A short dedupe window: deleting the sagas at the end leaves their processed ids to expire.
    # The orchestrator is not started (the pipeline is driven directly): give the store its partitions.
    store = RedisStateStore(os.environ.get("REDIS_URL"), key_prefix=prefix, dedupe_ttl=60, partitions=4)
    bus = InMemoryEventBus(topic_prefix=prefix)
    orchestrator = Orchestrator(builder.build(), bus, store, max_batch=BATCH)
    await bus.start()
    now = datetime.now(UTC)
    txs = [f"t{i}" for i in range(sagas)]

    def message(topic: str, offset: int, event: StartSaga | StepResult) -> InboundMessage:
        return InboundMessage(topic, 0, offset, event.transaction_id.encode(), encode(event))

    def start(i: int, tx: str) -> InboundMessage:
        body = StartBody(context={"x": 1})
        event = StartSaga(
            event_id=str(uuid.uuid4()), transaction_id=tx, workflow_id="bench", occurred_at=now, body=body
        )
        return message(orchestrator.topics.start, i, event)

    runs: dict[str, str] = {}  # each saga's run id, read once the starts are in (not timed)

    def result(i: int, tx: str, step: str) -> InboundMessage:
        body = ResultBody(
            command_id=command_id(tx, step, "execute", 1, runs[tx]),
            step=step,
            kind="execute",
            attempt=1,
            status="succeeded",
            result={"ok": step},
        )
        event = StepResult(
            event_id=str(uuid.uuid4()), transaction_id=tx, workflow_id="bench", occurred_at=now, body=body
        )
        return message(orchestrator.topics.results, i, event)

    async def drive(messages: list[InboundMessage]) -> float:
        began = time.process_time()
        completions = [
            await orchestrator.pipeline.handle_batch(messages[k : k + BATCH]) for k in range(0, sagas, BATCH)
        ]
        await asyncio.gather(*completions)
        return time.process_time() - began

    try:
        starts = [start(i, tx) for i, tx in enumerate(txs)]
        cpu = await drive(starts)
        runs.update({tx: saga.run_id for tx, saga in (await store.load_contexts(txs)).items()})
        for step in STEPS:
            cpu += await drive([result(i, tx, step) for i, tx in enumerate(txs)])
        last = await store.load_context(txs[-1])
        if last is None or last.state != "completed":
            raise SystemExit(f"the last saga did not complete: {last}")
        return cpu / (len(STEPS) * sagas) * 1e6
    finally:
        await orchestrator.pipeline.drain(5.0)
        for tx in txs:
            await store.delete_context(tx)
        await store.close()
        await bus.stop()


if __name__ == "__main__":
    print(f"{asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 6000)):.1f} us of CPU per step")
