"""The orchestrator's saga cache never lets a stale view win: the store's version check decides."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from orchestrator_kafka import InMemoryEventBus, InMemoryStateStore, Orchestrator, WorkflowBuilder
from orchestrator_kafka.models import ResultBody, StartBody, StartSaga, StepResult


def result(tx: str, step: str) -> StepResult:
    return StepResult(
        event_id=str(uuid.uuid4()),
        transaction_id=tx,
        workflow_id="wf",
        occurred_at=datetime.now(UTC),
        body=ResultBody(
            command_id=f"{tx}:{step}:execute:1", step=step, kind="execute", attempt=1, status="succeeded"
        ),
    )


async def test_two_instances_with_stale_caches_apply_each_transition_once() -> None:
    workflow = WorkflowBuilder("wf").add_step("a", "wa").add_step("b", "wb").add_step("c", "wc").build()
    store = InMemoryStateStore()
    first = Orchestrator(workflow, InMemoryEventBus(), store)
    second = Orchestrator(workflow, InMemoryEventBus(), store)
    for o in (first, second):
        await o.event_bus.start()
    start = StartSaga(
        event_id="s", transaction_id="tx", workflow_id="wf", occurred_at=datetime.now(UTC), body=StartBody()
    )
    await first.process([start])  # first caches version 1
    [outcome] = await second.process([result("tx", "a")])  # second loads version 1, writes version 2
    assert outcome.transition is not None and outcome.transition.changed
    # first's cached version 1 is stale: its write conflicts, it reloads version 2 and decides again.
    [outcome] = await first.process([result("tx", "b")])
    assert outcome.transition is not None and outcome.transition.changed
    # second's cache (version 2) is stale too; a duplicate of b's result changes nothing.
    [outcome] = await second.process([result("tx", "b")])
    assert outcome.transition is not None and not outcome.transition.changed
    saga = await store.load_context("tx")
    assert saga is not None and saga.version == 3
    assert saga.completed == ["a", "b"] and saga.current_step == "c"
