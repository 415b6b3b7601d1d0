"""Run ids: a saga started again under a reused transaction id never meets an earlier saga's results."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

from orchestrator_kafka import SagaClient, StepContext, WorkflowBuilder
from orchestrator_kafka.codec import encode
from orchestrator_kafka.models import ResultBody, StepResult, command_id
from orchestrator_kafka.ports import OutboxMessage

from ..conftest import Backend
from .harness import Harness, ok
from .test_messaging import Tap, headers


def two_steps() -> WorkflowBuilder:
    return WorkflowBuilder("runs").add_step("a", "worker_a").add_step("b", "worker_b")


def result_of(tx: str, cid: str, step: str) -> StepResult:
    return StepResult(
        event_id=str(uuid.uuid4()),
        transaction_id=tx,
        workflow_id="runs",
        occurred_at=datetime.now(UTC),
        body=ResultBody(
            command_id=cid, step=step, kind="execute", attempt=1, status="succeeded", result={"old": True}
        ),
    )


async def test_a_saga_started_again_under_a_deleted_sagas_id_completes(backend: Backend) -> None:
    handlers = {"worker_a": ok({"a": 1}), "worker_b": ok({"b": 2})}
    async with Harness(backend, [two_steps().build()], handlers) as h:
        tx = f"reused-{uuid.uuid4().hex[:8]}"
        await h.orchestrator.execute_workflow("runs", {}, transaction_id=tx)
        first = await h.wait_final(tx)
        assert first["state"] == "completed" and first["run_id"]
        assert await backend.store.delete_context(tx)
        await h.orchestrator.execute_workflow("runs", {"again": True}, transaction_id=tx)
        second = await h.wait_final(tx, timeout=20)
    assert second["state"] == "completed"
    assert second["run_id"] != first["run_id"]
    # The worker ran every step again: the new commands are not the old ones its dedupe window knows.
    assert h.executed(tx) == [("a", 1), ("b", 1), ("a", 1), ("b", 1)]


async def test_a_client_starts_a_saga_again_under_a_deleted_sagas_id(backend: Backend) -> None:
    handlers = {"worker_a": ok({"a": 1}), "worker_b": ok({"b": 2})}
    async with Harness(backend, [two_steps().build()], handlers) as h:
        client = SagaClient(h.orchestrator.event_bus, backend.store)
        tx = await client.start_saga("runs", {}, transaction_id=f"reused-{uuid.uuid4().hex[:8]}")
        first = await client.wait_for(tx, timeout=30)
        # A second request while the saga exists starts nothing.
        await client.start_saga("runs", {"twice": True}, transaction_id=tx)
        assert await backend.store.delete_context(tx)
        # Once it is deleted, a start under its id is a new saga, not a duplicate of the first request.
        await client.start_saga("runs", {"again": True}, transaction_id=tx)
        async with asyncio.timeout(30):
            while (saga := await backend.store.load_context(tx)) is None or saga.run_id == first["run_id"]:
                await asyncio.sleep(0.02)
        second = await client.wait_for(tx, timeout=30)
        await client.close()
    assert second["state"] == "completed" and second["run_id"] != first["run_id"]
    assert "twice" not in second["step_results"] and len(h.executed(tx)) == 4


async def test_late_results_of_a_deleted_saga_or_an_earlier_run_are_dead_lettered(backend: Backend) -> None:
    release = asyncio.Event()

    async def slow_a(ctx: StepContext) -> dict[str, int]:
        if ctx.data.get("again"):
            await release.wait()
        return {"a": 1}

    async with Harness(backend, [two_steps().build()], {"worker_a": slow_a, "worker_b": ok({})}) as h:
        bus, topics = h.orchestrator.event_bus, h.orchestrator.topics
        tap = await Tap().attach(bus, [topics.dlq])
        tx = f"late-{uuid.uuid4().hex[:8]}"
        await h.orchestrator.execute_workflow("runs", {}, transaction_id=tx)
        first = await h.wait_final(tx)
        old_cid = command_id(tx, "a", "execute", 1, first["run_id"])
        assert await backend.store.delete_context(tx)
        # A late result of the deleted saga: no saga to apply it to.
        deleted = result_of(tx, old_cid, "a")
        await bus.publish([OutboxMessage(topics.results, tx, encode(deleted))])
        await tap.wait_for(1)
        # The same transaction id started again, waiting on step a: an old run's result is refused.
        await h.orchestrator.execute_workflow("runs", {"again": True}, transaction_id=tx)
        await h.wait_state(tx, {"running"})
        stale = result_of(tx, old_cid, "a")
        await bus.publish([OutboxMessage(topics.results, tx, encode(stale))])
        dead = await tap.wait_for(2)
        running = await h.orchestrator.get_status(tx)
        assert running["state"] == "running" and running["steps"]["a"] == "running"
        release.set()
        final = await h.wait_final(tx)
    assert final["state"] == "completed" and "old" not in final["step_results"]["a"]
    reasons = {m.value: headers(m)["dlq.reason"] for m in dead}
    assert reasons == {encode(deleted): b"unknown_transaction", encode(stale): b"other_run"}
