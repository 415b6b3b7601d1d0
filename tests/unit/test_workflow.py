"""The workflow builder, RetryPolicy and the immutable WorkflowDefinition."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import pytest

from orchestrator_kafka import IWorkflowDefinition, OrchestratorError, ValidationError
from orchestrator_kafka.context import SagaContext
from orchestrator_kafka.workflow import RetryPolicy, WorkflowBuilder, WorkflowDefinition, WorkflowStep


def ctx(**data: Any) -> SagaContext:
    return SagaContext(transaction_id="tx", workflow_id="wf", data=data)


def names(steps: list[WorkflowStep]) -> list[str]:
    return [s.name for s in steps]


# ---------------------------------------------------------------- building


def test_builder_methods_chain_and_build_an_immutable_definition() -> None:
    builder = WorkflowBuilder("order")
    policy = RetryPolicy(max_retries=1)
    assert builder.add_step("reserve", "reserve_inventory", compensation="release_inventory") is builder
    assert builder.add_conditional_step("vip", "vip_handler", lambda c: True) is builder
    assert (
        builder.add_parallel_steps([{"name": "a", "worker_name": "wa"}, {"name": "b", "worker_name": "wb"}])
        is builder
    )
    assert builder.add_step("ship", "ship_order", timeout=5, retry=policy) is builder
    assert builder.with_retry_config(max_retries=1) is builder
    definition = builder.build()

    assert isinstance(definition, WorkflowDefinition)
    assert isinstance(definition, IWorkflowDefinition)
    assert definition.get_id() == "order"
    assert names(definition.get_steps()) == ["reserve", "vip", "a", "b", "ship"]
    reserve, vip, _a, _b, ship = definition.get_steps()
    assert (reserve.worker_name, reserve.compensation, reserve.timeout, reserve.retry) == (
        "reserve_inventory",
        "release_inventory",
        None,
        None,
    )
    assert vip.condition is not None and reserve.condition is None
    assert ship.timeout == 5.0 and isinstance(ship.timeout, float)
    assert ship.retry is policy
    assert [[s.name for s in stage] for stage in definition.stages] == [
        ["reserve"],
        ["vip"],
        ["a", "b"],
        ["ship"],
    ]


def test_spec_example_builds() -> None:
    workflow = (
        WorkflowBuilder("order_processing")
        .add_step("validate", "validate_order")
        .add_step("process", "process_payment", compensation="refund_payment")
        .add_step("fulfill", "fulfill_order")
        .build()
    )
    assert names(workflow.get_steps()) == ["validate", "process", "fulfill"]
    assert workflow.get_steps()[1].compensation == "refund_payment"


def test_retry_config_is_the_default_and_a_step_policy_overrides_it() -> None:
    own = RetryPolicy(max_retries=0)
    definition = (
        WorkflowBuilder("wf")
        .add_step("a", "wa")
        .add_step("b", "wb", retry=own)
        .with_retry_config(max_retries=5, backoff_factor=3.0, initial_delay=0.5, max_delay=10.0)
        .build()
    )
    assert definition.retry_policy == RetryPolicy(5, 3.0, 0.5, 10.0)
    a, b = definition.get_steps()
    assert definition.retry_for(a) == RetryPolicy(5, 3.0, 0.5, 10.0)
    assert definition.retry_for(b) is own


def test_default_retry_policy_is_three_retries() -> None:
    definition = WorkflowBuilder("wf").add_step("a", "wa").build()
    assert definition.retry_policy == RetryPolicy(
        max_retries=3, backoff_factor=2.0, initial_delay=1.0, max_delay=60.0
    )


def test_parallel_entries_take_compensation_timeout_and_retry() -> None:
    policy = RetryPolicy(max_retries=2)
    definition = (
        WorkflowBuilder("wf")
        .add_parallel_steps(
            (
                {"name": "a", "worker_name": "wa", "compensation": "ua", "timeout": 2, "retry": policy},
                {"name": "b", "worker_name": "wb"},
            )
        )
        .build()
    )
    a, b = definition.get_steps()
    assert (a.compensation, a.timeout, a.retry) == ("ua", 2.0, policy)
    assert (b.compensation, b.timeout, b.retry) == (None, None, None)


def test_single_entry_parallel_group_is_allowed() -> None:
    definition = WorkflowBuilder("wf").add_parallel_steps([{"name": "a", "worker_name": "wa"}]).build()
    assert names(definition.get_steps()) == ["a"]


# ---------------------------------------------------------------- validation errors


def test_validation_error_is_an_orchestrator_error_and_a_value_error() -> None:
    assert issubclass(ValidationError, OrchestratorError)
    assert issubclass(ValidationError, ValueError)


def test_empty_workflow_fails_at_build() -> None:
    builder = WorkflowBuilder("wf").with_retry_config()
    with pytest.raises(ValidationError, match="no steps"):
        builder.build()


@pytest.mark.parametrize(
    "make",
    [
        lambda b: b.add_step("a", "w1").add_step("a", "w2"),
        lambda b: b.add_step("a", "w1").add_conditional_step("a", "w2", lambda c: True),
        lambda b: b.add_parallel_steps(
            [{"name": "a", "worker_name": "w1"}, {"name": "a", "worker_name": "w2"}]
        ),
        lambda b: b.add_step("a", "w1").add_parallel_steps(
            [{"name": "x", "worker_name": "w"}, {"name": "a", "worker_name": "w"}]
        ),
        lambda b: b.add_parallel_steps(
            [{"name": "x", "worker_name": "w"}, {"name": "a", "worker_name": "w"}]
        ).add_parallel_steps([{"name": "a", "worker_name": "w"}, {"name": "y", "worker_name": "w"}]),
        lambda b: b.add_parallel_steps(
            [{"name": "b", "worker_name": "w"}, {"name": "a", "worker_name": "w"}]
        ).add_step("a", "w"),
    ],
    ids=["sequential", "conditional", "within-group", "step-then-group", "across-groups", "group-then-step"],
)
def test_duplicate_step_names_fail_at_build(make: Any) -> None:
    builder = make(WorkflowBuilder("wf"))
    with pytest.raises(ValidationError, match="two steps named 'a'"):
        builder.build()


def test_same_worker_for_two_steps_is_fine() -> None:
    definition = WorkflowBuilder("wf").add_step("a", "w").add_step("b", "w", compensation="w").build()
    assert names(definition.get_steps()) == ["a", "b"]


BAD_NAMES = ["", "has space", "a/b", "a:b", "topic#1", "ünïcode", "x" * 201, 5, None, b"bytes"]
GOOD_NAMES = ["a", "A-b_c.d", "x" * 200, "0"]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_bad_names_are_rejected_when_added(bad: Any) -> None:
    attempts: list[Callable[[], object]] = [
        lambda: WorkflowBuilder(bad),
        lambda: WorkflowBuilder("wf").add_step(bad, "worker"),
        lambda: WorkflowBuilder("wf").add_step("step", bad),
        lambda: WorkflowBuilder("wf").add_conditional_step("step", bad, lambda c: True),
        lambda: WorkflowBuilder("wf").add_parallel_steps([{"name": bad, "worker_name": "w"}]),
        lambda: WorkflowBuilder("wf").add_parallel_steps([{"name": "s", "worker_name": bad}]),
    ]
    if bad is not None:  # None is the valid "no compensation"
        attempts.append(lambda: WorkflowBuilder("wf").add_step("step", "worker", compensation=bad))
        attempts.append(
            lambda: WorkflowBuilder("wf").add_parallel_steps(
                [{"name": "s", "worker_name": "w", "compensation": bad}]
            )
        )
    for attempt in attempts:
        with pytest.raises(ValidationError, match="must be 1 to 200 characters"):
            attempt()


@pytest.mark.parametrize("good", GOOD_NAMES)
def test_names_in_the_kafka_topic_alphabet_are_accepted(good: str) -> None:
    definition = WorkflowBuilder(good).add_step(good, good, compensation=good).build()
    assert definition.get_id() == good
    assert definition.get_steps()[0].worker_name == good


@pytest.mark.parametrize("bad", [0, -1, -0.5, math.nan, math.inf, True, False, "5", [1]])
def test_bad_timeouts_are_rejected(bad: Any) -> None:
    with pytest.raises(ValidationError, match="timeout"):
        WorkflowBuilder("wf").add_step("a", "w", timeout=bad)
    with pytest.raises(ValidationError, match="timeout"):
        WorkflowBuilder("wf").add_conditional_step("a", "w", lambda c: True, timeout=bad)
    with pytest.raises(ValidationError, match="timeout"):
        WorkflowBuilder("wf").add_parallel_steps([{"name": "a", "worker_name": "w", "timeout": bad}])


@pytest.mark.parametrize("good", [0.001, 1, 2.5, 3600])
def test_positive_timeouts_are_floats(good: float) -> None:
    step = WorkflowBuilder("wf").add_step("a", "w", timeout=good).build().get_steps()[0]
    assert step.timeout == float(good) and isinstance(step.timeout, float)


@pytest.mark.parametrize("bad", [3, {"max_retries": 1}, "RetryPolicy()", True])
def test_retry_must_be_a_retry_policy(bad: Any) -> None:
    with pytest.raises(ValidationError, match="RetryPolicy"):
        WorkflowBuilder("wf").add_step("a", "w", retry=bad)
    with pytest.raises(ValidationError, match="RetryPolicy"):
        WorkflowBuilder("wf").add_parallel_steps([{"name": "a", "worker_name": "w", "retry": bad}])


@pytest.mark.parametrize("bad", [None, True, "a", 1])
def test_condition_must_be_callable(bad: Any) -> None:
    with pytest.raises(ValidationError, match="callable"):
        WorkflowBuilder("wf").add_conditional_step("a", "w", bad)


@pytest.mark.parametrize(
    ("steps", "match"),
    [
        ({"name": "a", "worker_name": "w"}, "non-empty list"),
        ("ab", "non-empty list"),
        (b"ab", "non-empty list"),
        (None, "non-empty list"),
        (5, "non-empty list"),
        ([], "non-empty list"),
        ((), "non-empty list"),
        (["a"], "must be a dict"),
        ([("name", "a")], "must be a dict"),
        ([{"name": "a", "worker_name": "w"}, None], "#1 must be a dict"),
        ([{"worker_name": "w"}], "no 'name'"),
        ([{"name": "a"}], "no 'worker_name'"),
        ([{"name": "a", "worker_name": "w", "compensate": "u"}], r"unknown keys \['compensate'\]"),
        ([{"name": "a", "worker_name": "w", "condition": lambda c: True}], "unknown keys"),
    ],
    ids=[
        "dict",
        "str",
        "bytes",
        "none",
        "int",
        "empty-list",
        "empty-tuple",
        "entry-str",
        "entry-tuple",
        "second-entry-none",
        "no-name",
        "no-worker",
        "typo-key",
        "condition-key",
    ],
)
def test_bad_parallel_entries_are_rejected(steps: Any, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        WorkflowBuilder("wf").add_parallel_steps(steps)


# ---------------------------------------------------------------- RetryPolicy


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_retries": -1},
        {"max_retries": True},
        {"max_retries": 1.5},
        {"max_retries": "3"},
        {"backoff_factor": 0.5},
        {"backoff_factor": 0},
        {"backoff_factor": True},
        {"backoff_factor": math.nan},
        {"backoff_factor": math.inf},
        {"backoff_factor": "2"},
        {"initial_delay": -0.1},
        {"initial_delay": math.inf},
        {"initial_delay": math.nan},
        {"initial_delay": False},
        {"max_delay": math.inf},
        {"max_delay": -1.0},
        {"initial_delay": 10.0, "max_delay": 5.0},
    ],
)
def test_bad_retry_policies_are_rejected(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        RetryPolicy(**kwargs)
    with pytest.raises(ValidationError):
        WorkflowBuilder("wf").with_retry_config(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_retries": 0},
        {"backoff_factor": 1},
        {"initial_delay": 0, "max_delay": 0},
        {"initial_delay": 5, "max_delay": 5},
    ],
)
def test_edge_retry_policies_are_accepted(kwargs: dict[str, Any]) -> None:
    RetryPolicy(**kwargs)


def test_delay_grows_by_the_factor_and_is_capped() -> None:
    default = RetryPolicy()
    assert [default.delay(n) for n in range(1, 9)] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    custom = RetryPolicy(max_retries=5, backoff_factor=3.0, initial_delay=0.5, max_delay=10.0)
    assert [custom.delay(n) for n in range(1, 6)] == [0.5, 1.5, 4.5, 10.0, 10.0]
    assert [RetryPolicy(backoff_factor=1.0, initial_delay=2.0).delay(n) for n in (1, 2, 10)] == [
        2.0,
        2.0,
        2.0,
    ]
    assert RetryPolicy(initial_delay=0.0, max_delay=0.0).delay(3) == 0.0
    assert isinstance(RetryPolicy(initial_delay=1, max_delay=60).delay(1), float)


def test_delay_of_a_late_retry_is_capped_not_an_overflow() -> None:
    # "Retry every minute, for a long time" is a valid policy: the cap must win over float overflow.
    assert RetryPolicy(max_retries=10_000).delay(10_000) == 60.0
    assert RetryPolicy(max_retries=400, backoff_factor=10.0, max_delay=30.0).delay(400) == 30.0


def test_retry_policy_and_steps_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        RetryPolicy().max_retries = 5  # type: ignore[misc]
    step = WorkflowBuilder("wf").add_step("a", "w").build().get_steps()[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        step.name = "b"  # type: ignore[misc]


# ---------------------------------------------------------------- the definition


def test_definition_is_not_changed_by_its_callers_or_its_builder() -> None:
    builder = (
        WorkflowBuilder("wf")
        .add_step("a", "w")
        .add_parallel_steps([{"name": "b", "worker_name": "w"}, {"name": "c", "worker_name": "w"}])
    )
    definition = builder.build()
    steps = definition.get_steps()
    steps.clear()
    assert names(definition.get_steps()) == ["a", "b", "c"]
    assert definition.get_steps() is not definition.get_steps()
    builder.add_step("d", "w").with_retry_config(max_retries=0)
    assert names(definition.get_steps()) == ["a", "b", "c"]
    assert definition.retry_policy.max_retries == 3
    assert isinstance(definition.stages, tuple) and all(isinstance(s, tuple) for s in definition.stages)
    assert names(builder.build().get_steps()) == ["a", "b", "c", "d"]


def test_initial_step() -> None:
    assert WorkflowBuilder("wf").add_step("a", "w").add_step("b", "w").build().get_initial_step().name == "a"  # type: ignore[union-attr]
    grouped = WorkflowBuilder("wf").add_parallel_steps(
        [{"name": "p", "worker_name": "w"}, {"name": "q", "worker_name": "w"}]
    )
    assert grouped.build().get_initial_step().name == "p"  # type: ignore[union-attr]


def test_next_step_follows_definition_order_and_conditions() -> None:
    definition = (
        WorkflowBuilder("wf")
        .add_step("a", "w")
        .add_conditional_step("vip", "w", lambda c: c.get("tier") == "premium")
        .add_conditional_step("big", "w", lambda c: c.get("amount", 0) > 100)
        .add_step("z", "w")
        .build()
    )
    assert definition.get_next_step("a", ctx(tier="premium")).name == "vip"  # type: ignore[union-attr]
    assert definition.get_next_step("a", ctx(tier="basic", amount=500)).name == "big"  # type: ignore[union-attr]
    assert definition.get_next_step("a", ctx()).name == "z"  # type: ignore[union-attr]
    assert definition.get_next_step("vip", ctx(amount=1)).name == "z"  # type: ignore[union-attr]
    assert definition.get_next_step("z", ctx(tier="premium")) is None


def test_next_step_is_none_when_every_later_condition_is_false() -> None:
    definition = (
        WorkflowBuilder("wf").add_step("a", "w").add_conditional_step("b", "w", lambda c: False).build()
    )
    assert definition.get_next_step("a", ctx()) is None


def test_next_step_around_parallel_groups() -> None:
    definition = (
        WorkflowBuilder("wf")
        .add_step("a", "w")
        .add_parallel_steps([{"name": "p", "worker_name": "w"}, {"name": "q", "worker_name": "w"}])
        .add_step("z", "w")
        .build()
    )
    assert definition.get_next_step("a", ctx()).name == "p"  # type: ignore[union-attr]
    # Every branch of a group is followed by the stage after the group, not by its sibling.
    assert definition.get_next_step("p", ctx()).name == "z"  # type: ignore[union-attr]
    assert definition.get_next_step("q", ctx()).name == "z"  # type: ignore[union-attr]
    assert definition.stage_of("p") == definition.stage_of("q") == 1
    assert definition.step("q") is definition.get_steps()[2]
    assert definition.step("nope") is None


def test_next_step_of_an_unknown_step_raises() -> None:
    definition = WorkflowBuilder("wf").add_step("a", "w").build()
    with pytest.raises(ValidationError, match="no step 'nope'"):
        definition.get_next_step("nope", ctx())
