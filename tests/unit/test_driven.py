"""A user's own IWorkflowDefinition, driven through get_initial_step and get_next_step."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator_kafka import Orchestrator, ValidationError
from orchestrator_kafka.backends.memory import InMemoryEventBus, InMemoryStateStore
from orchestrator_kafka.context import SagaContext, StepStatus, WorkflowState
from orchestrator_kafka.driven import as_definition
from orchestrator_kafka.workflow import IWorkflowDefinition, WorkflowBuilder, WorkflowStep

from .engine_sim import Driver, actions

A = WorkflowStep("a", "wa", compensation="ua")
B = WorkflowStep("b", "wb", compensation="ub")
C = WorkflowStep("c", "wc")


class Shipping(IWorkflowDefinition):
    """a, then b unless the saga's data says ``express``, then c; ``after_b`` overrides what follows b."""

    def __init__(self, after_b: Any = C, steps: list[Any] | None = None) -> None:
        self.after_b = after_b
        self.steps = steps if steps is not None else [A, B, C]

    def get_id(self) -> str:
        return "shipping"

    def get_steps(self) -> list[WorkflowStep]:
        return self.steps

    def get_initial_step(self) -> WorkflowStep | None:
        return A

    def get_next_step(self, current_step: str, context: SagaContext) -> WorkflowStep | None:
        if current_step == "a":
            return C if context.get("express") else B
        if current_step == "b":
            if isinstance(self.after_b, Exception):
                raise self.after_b
            return self.after_b  # type: ignore[no-any-return]
        return None


def test_a_user_definition_runs_the_steps_it_picks_in_order() -> None:
    d = Driver(as_definition(Shipping()))
    d.start()
    assert [c.body.step for _, c in d.commands] == ["a"]
    d.succeed("a")
    d.succeed("b")
    t = d.succeed("c")
    assert t.saga is not None and t.saga.state is WorkflowState.COMPLETED
    assert [c.body.step for _, c in d.commands] == ["a", "b", "c"]


def test_the_next_step_is_picked_on_the_sagas_data() -> None:
    d = Driver(as_definition(Shipping()))
    d.start(express=True)
    t = d.succeed("a")
    assert actions(t) == ["step_succeeded", "step_skipped", "step_dispatched"]
    t = d.succeed("c")
    assert t.saga is not None and t.saga.state is WorkflowState.COMPLETED
    assert t.saga.steps["b"].status is StepStatus.SKIPPED


def test_none_ends_the_saga() -> None:
    d = Driver(as_definition(Shipping(after_b=None)))
    d.start()
    d.succeed("a")
    t = d.succeed("b")
    assert t.saga is not None and t.saga.state is WorkflowState.COMPLETED and "c" not in t.saga.step_results


@pytest.mark.parametrize(
    ("after_b", "named"),
    [
        (A, "Shipping.get_next_step('b') returned step 'a', which does not come after 'b'"),
        (B, "Shipping.get_next_step('b') returned step 'b', which does not come after 'b'"),
        (WorkflowStep("zz", "wz"), "Shipping.get_next_step('b') returned WorkflowStep(name='zz'"),
        ("c", "Shipping.get_next_step('b') returned 'c', which is not a step"),
        (KeyError("sku"), "Shipping.get_next_step('b') raised KeyError: 'sku'"),
    ],
)
def test_a_next_step_the_engine_cannot_run_rolls_the_saga_back_naming_it(after_b: Any, named: str) -> None:
    d = Driver(as_definition(Shipping(after_b=after_b)))
    d.start()
    d.succeed("a")
    t = d.succeed("b")
    assert t.saga is not None and t.saga.state is WorkflowState.COMPENSATING
    assert "next_step_failed" in (t.saga.error or "") and named in (t.saga.error or "")
    d.succeed("b", kind="compensate")
    t = d.succeed("a", kind="compensate")
    assert t.saga is not None and t.saga.state is WorkflowState.COMPENSATED


def test_what_a_definition_returns_is_checked_when_the_orchestrator_is_made() -> None:
    bus, store = InMemoryEventBus(), InMemoryStateStore()
    cases = [
        (Shipping(steps=[]), "Shipping.get_steps() must return a non-empty list of WorkflowStep"),
        (Shipping(steps=[A, "b"]), "Shipping.get_steps() item #1 must be a WorkflowStep, got str"),
        (Shipping(steps=[A, A]), "Shipping.get_steps() lists two steps named 'a'"),
        (Shipping(steps=[A, WorkflowStep("b", "no spaces")]), "worker_name of step 'b'"),
    ]
    for definition, message in cases:
        with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
            Orchestrator(definition, bus, store)
    with pytest.raises(ValidationError, match="expected an IWorkflowDefinition"):
        Orchestrator([object()], bus, store)  # type: ignore[list-item]


def test_a_driven_definition_has_a_version_and_topics_of_its_workers() -> None:
    orchestrator = Orchestrator(Shipping(), InMemoryEventBus(), InMemoryStateStore())
    driven = orchestrator.workflows["shipping"]
    assert [s.name for s in driven.get_steps()] == ["a", "b", "c"]
    assert driven.version == as_definition(Shipping()).version
    built = (
        WorkflowBuilder("shipping")
        .add_step("a", "wa", "ua")
        .add_step("b", "wb", "ub")
        .add_step("c", "wc")
        .build()
    )
    assert driven.version != built.version  # its steps are picked, not conditional on nothing
    assert as_definition(built) is built
