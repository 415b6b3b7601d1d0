"""Workflow versions: fingerprints of a definition's shape, the versions an orchestrator carries, and
the engine's parking and resuming of a saga."""

from __future__ import annotations

from datetime import timedelta

import pytest

from orchestrator_kafka import Orchestrator, ValidationError, WorkflowBuilder, WorkflowExecutionError
from orchestrator_kafka.backends.memory import InMemoryEventBus, InMemoryStateStore
from orchestrator_kafka.context import SagaContext
from orchestrator_kafka.engine import decide, park
from orchestrator_kafka.versions import Versions
from orchestrator_kafka.workflow import WorkflowDefinition

from .engine_sim import T0, Driver, actions, result_event


def is_big(ctx: SagaContext) -> bool:
    return bool(ctx.get("big"))


def is_small(ctx: SagaContext) -> bool:
    return not ctx.get("big")


def shape(**change: object) -> WorkflowDefinition:
    """A workflow of every kind of step; ``change`` alters one part of it."""
    b = WorkflowBuilder("wf", version=change.get("version"))  # type: ignore[arg-type]
    b.add_step(str(change.get("first", "a")), str(change.get("worker", "wa")), compensation="ua")
    b.add_conditional_step("c", "wc", change.get("condition", is_big), compensation=change.get("undo", "uc"))  # type: ignore[arg-type]
    b.add_parallel_steps(
        [
            {"name": "p1", "worker_name": "w1", "timeout": change.get("timeout")},
            {"name": "p2", "worker_name": "w2"},
        ]
    )
    if change.get("retry"):
        b.with_retry_config(max_retries=9)
    return b.build()


def test_the_fingerprint_follows_the_shape_and_nothing_else() -> None:
    base = shape().version
    assert base == shape().version and len(base) == 12
    for changed in (
        {"first": "a2"},  # a step renamed
        {"worker": "wz"},  # another worker
        {"undo": "uz"},  # another compensation
        {"undo": None},  # no compensation
        {"condition": is_small},  # another condition
    ):
        assert shape(**changed).version != base, changed
    # Timeouts and retry policies are not the shape: a saga in flight can take a changed one.
    assert shape(timeout=5.0).version == base and shape(retry=True).version == base
    reordered = (
        WorkflowBuilder("wf").add_step("x", "wx").add_step("y", "wy").build(),
        WorkflowBuilder("wf").add_step("y", "wy").add_step("x", "wx").build(),
        WorkflowBuilder("wf")
        .add_parallel_steps([{"name": "x", "worker_name": "wx"}, {"name": "y", "worker_name": "wy"}])
        .build(),
    )
    assert len({d.version for d in reordered}) == 3


def test_a_given_version_is_used_and_checked() -> None:
    assert shape(version="2024-06.1").version == "2024-06.1"
    with pytest.raises(ValidationError, match="version"):
        WorkflowBuilder("wf", version="no spaces")


def test_new_sagas_take_the_last_version_given_or_the_named_default() -> None:
    one = WorkflowBuilder("wf", version="1").add_step("a", "wa").build()
    two = WorkflowBuilder("wf", version="2").add_step("a", "wa").add_step("b", "wb").build()
    other = WorkflowBuilder("other").add_step("a", "wa").build()
    versions = Versions([one, two, other])
    assert versions.default("wf") is two and versions.versions("wf") == ["1", "2"]
    assert versions.get("wf", "1") is one and versions.get("wf", "3") is None
    assert versions.get("wf", "") is two  # a saga stored before versions runs on the default
    assert Versions([one, two], {"wf": "1"}).default("wf") is one
    with pytest.raises(ValidationError, match="version '1'"):
        Versions([one, WorkflowBuilder("wf", version="1").add_step("z", "wz").build()])
    with pytest.raises(ValidationError, match="default version '3'"):
        Versions([one, two], {"wf": "3"})
    orchestrator = Orchestrator([one, two], InMemoryEventBus(), InMemoryStateStore())
    assert orchestrator.workflows["wf"] is two and orchestrator.versions.versions("wf") == ["1", "2"]


def test_a_saga_records_its_version_and_runs_on_it() -> None:
    d = Driver(shape(version="v7"))
    t = d.start(big=True)
    assert t.saga is not None and t.saga.workflow_version == "v7"


def test_a_parked_saga_says_why_once_and_resumes_on_its_next_event() -> None:
    d = Driver(WorkflowBuilder("wf", version="1").add_step("a", "wa").add_step("b", "wb").build())
    d.start()
    assert d.saga is not None
    parked = park(d.saga, "workflow 'wf' version '1' is not loaded here", T0 + timedelta(seconds=1))
    assert parked.changed and parked.saga is not None
    assert parked.saga.parked == "workflow 'wf' version '1' is not loaded here"
    assert parked.saga.version == d.saga.version + 1 and parked.saga.state is d.saga.state
    assert actions(parked) == ["saga_parked"] and parked.commands == ()
    assert parked.audit is not None and parked.audit.body.actions[0].error == parked.saga.parked
    assert park(parked.saga, "again", T0).changed is False
    assert parked.saga.to_status()["parked"] == parked.saga.parked
    d.saga = parked.saga
    t = d.succeed("a")
    assert actions(t) == ["saga_resumed", "step_succeeded", "step_dispatched"]
    assert t.saga is not None and t.saga.parked is None


def test_a_parked_saga_resumes_even_on_an_event_that_changes_nothing_else() -> None:
    d = Driver(WorkflowBuilder("wf").add_step("a", "wa").add_step("b", "wb").build())
    d.start()
    first = d.command("a")
    d.succeed("a")
    assert d.saga is not None
    parked = park(d.saga, "not loaded", T0).saga
    assert parked is not None
    t = decide(d.definition, parked, result_event(first, result={}), T0)
    assert t.changed and actions(t) == ["saga_resumed"] and t.note == "duplicate result"
    assert t.saga is not None and t.saga.parked is None


async def test_a_repeated_start_of_a_saga_of_a_version_not_loaded_changes_nothing() -> None:
    store = InMemoryStateStore()
    one = WorkflowBuilder("wf", version="1").add_step("a", "wa").build()
    two = WorkflowBuilder("wf", version="2").add_step("a2", "wa").build()
    async with Orchestrator(one, InMemoryEventBus(), store) as first:
        await first.execute_workflow("wf", {}, transaction_id="tx")
    before = await store.load_context("tx")
    async with Orchestrator(two, InMemoryEventBus(), store) as second:
        assert await second.execute_workflow("wf", {}, transaction_id="tx") == "tx"
        unchanged = await store.load_context("tx")
        assert unchanged == before  # not parked: a start of a known saga is no event of it
        with pytest.raises(WorkflowExecutionError, match="version '1' is not loaded here"):
            await second.cancel_workflow("tx")
    after = await store.load_context("tx")
    assert before is not None and after is not None
    assert after.workflow_version == "1" and after.version == before.version + 1  # parked by the cancel
    assert after.parked is not None and "version '1'" in after.parked
