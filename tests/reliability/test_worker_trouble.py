"""Worker trouble: 1,000 steps timing out in the same second, results that arrive after the timeout (a late
success is compensated, once), duplicate results (the same event again, and the same answer under a new
event id, as a worker that crashed before committing sends it), and results for sagas that were cancelled
or have ended. The test plays the misbehaving worker itself; the orchestrator and a well-behaved worker
(for the compensations) run as processes."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from typing import Any

import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from orchestrator_kafka.models import command_id
from orchestrator_kafka.ports import InboundMessage, OutboxMessage

from .harness import World

pytestmark = [pytest.mark.reliability, pytest.mark.kafka, pytest.mark.redis]


def answer(command: dict[str, Any], status: str = "succeeded", event_id: str | None = None) -> bytes:
    body = command["body"]
    return orjson.dumps(
        {
            "schema_version": "1.0",
            "event_id": event_id or str(uuid.uuid4()),
            "event_type": "step.result",
            "transaction_id": command["transaction_id"],
            "workflow_id": command["workflow_id"],
            "occurred_at": "2026-01-01T00:00:00Z",
            "body": {
                "command_id": body["command_id"],
                "step": body["step"],
                "kind": body["kind"],
                "attempt": body["attempt"],
                "status": status,
                "result": {"late": True} if status == "succeeded" else None,
                "error": None if status == "succeeded" else {"type": "Boom", "message": "late failure"},
            },
        }
    )


async def drained(world: World, timeout: float = 60) -> None:
    """Until the orchestrators' group has committed every message on the results topic."""
    topic = f"{world.prefix}.results"
    admin = AIOKafkaAdminClient(bootstrap_servers=world.bootstrap)
    await admin.start()
    deadline = time.monotonic() + timeout
    try:
        while True:
            ends = {(m.topic, m.partition): m.offset + 1 for m in await world.topic(topic)}
            ends_by_partition: dict[int, int] = {}
            for (_, p), end in ends.items():
                ends_by_partition[p] = max(ends_by_partition.get(p, 0), end)
            committed = await admin.list_consumer_group_offsets(f"{world.prefix}.orchestrator")
            done = {tp.partition: meta.offset for tp, meta in committed.items() if tp.topic == topic}
            if all(done.get(p, 0) >= end for p, end in ends_by_partition.items()):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"results not all committed: {ends_by_partition} vs {done}")
            await asyncio.sleep(0.5)
    finally:
        await admin.close()


@pytest.mark.timeout(300)
async def test_timeout_storm_late_and_duplicate_results_and_results_for_ended_sagas(world: World) -> None:
    await world.up(orchestrators=1, workers=1)
    # The misbehaving worker of rel_void: takes every command, answers none in time.
    commands: list[dict[str, Any]] = []

    async def take(batch: Sequence[InboundMessage]) -> None:
        commands.extend(orjson.loads(m.value or b"") for m in batch)

    await world.bus.start()
    await world.bus.subscribe([f"{world.prefix}.commands.rel_void"], f"{world.prefix}.fake", take)

    storm = await world.submit(["storm"] * 1000, workflow="rel_storm")
    regular = await world.submit(["ok"] * 60 + ["hold"] * 40)
    await world.wait_progress(regular, at_least=100)
    await world.cancel([tx for tx in regular if tx.endswith("-hold")])
    await world.wait_final([*storm, *regular], timeout=180)
    states = await world.progress(storm)
    assert states == {"compensated": 1000}, states  # every one timed out, once (checked by verify)
    assert len(commands) == 1000

    # Late successes of 100 timed-out steps: each delivered twice as the same event, and once more
    # under a new event id (the same answer re-sent by a worker that crashed before committing).
    late = commands[:100]
    out: list[OutboxMessage] = []
    results = f"{world.prefix}.results"
    for c in late:
        event_id = str(uuid.uuid4())
        out += [OutboxMessage(results, c["transaction_id"], answer(c, event_id=event_id))] * 2
        out.append(OutboxMessage(results, c["transaction_id"], answer(c)))
    # Late failures of others: nothing to undo, nothing happens.
    out += [OutboxMessage(results, c["transaction_id"], answer(c, "failed")) for c in commands[100:200]]
    # Results for ended sagas: a completed saga's steps and a cancelled saga's reserve answered again.
    runs = {k.decode() for k in await world.record.hkeys(f"{world.prefix}:runs")}
    run_ids = {tx: saga.run_id for tx, saga in (await world.sagas(regular)).items()}
    for tx in regular:
        for step in ("reserve", "charge", "ship"):
            cid = command_id(tx, step, "execute", 1, run_ids[tx])
            if cid in runs:
                again = {
                    "transaction_id": tx,
                    "workflow_id": "rel",
                    "body": {"command_id": cid, "step": step, "kind": "execute", "attempt": 1},
                }
                out.append(OutboxMessage(results, tx, answer(again)))
                out.append(OutboxMessage(results, tx, answer(again, "failed")))
    # A cancelled saga can end before its in-flight reserve answers; that genuine late answer moves it
    # once more (its compensation). Let every real answer be handled before taking the versions.
    deadline = time.monotonic() + 60
    holds = await world.command_ids([tx for tx in regular if tx.endswith("-hold")], "reserve")
    while not holds <= {k.decode() for k in await world.record.hkeys(f"{world.prefix}:ok")}:
        assert time.monotonic() < deadline, "the hold sagas' reserve steps never answered"
        await asyncio.sleep(0.5)
    await asyncio.sleep(2)  # the worker publishes right after recording
    await drained(world)
    await world.wait_outboxes_empty()
    await world.wait_final([*storm, *regular])
    before = {tx: s.version for tx, s in (await world.sagas(regular)).items()}
    await world.bus.publish(out)
    await drained(world)

    # Each late success got exactly one compensation, run once by the worker (verify checks "once").
    deadline = time.monotonic() + 60
    # A late compensation's id: its step's run prefix, then "wait:compensate:late-<n>.1".
    wanted = {
        f"{c['body']['command_id'].rsplit(':', 3)[0]}:wait:compensate:late-{c['body']['attempt']}.1"
        for c in late
    }
    while not wanted <= {k.decode() for k in await world.record.hkeys(f"{world.prefix}:runs")}:
        assert time.monotonic() < deadline, "late successes were not all compensated"
        await asyncio.sleep(0.5)
    # Their results settle the sagas' late compensations: a new version each, to wait for before verify.
    while any(s.late_runs for s in (await world.sagas(list({c["transaction_id"] for c in late}))).values()):
        assert time.monotonic() < deadline, "late compensations were not all settled"
        await asyncio.sleep(0.5)
    after = {tx: s.version for tx, s in (await world.sagas(regular)).items()}
    assert after == before  # results for ended sagas changed nothing
    report = await world.verify([*storm, *regular])
    assert report.states["compensated"] == 1000
    assert report.states["completed"] >= 60
    assert report.states.get("cancelled", 0) + report.states["completed"] == 100
