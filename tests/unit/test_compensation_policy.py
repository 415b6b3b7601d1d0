"""A compensation's own timeout and retry policy (add_step's compensation_timeout and
compensation_retry), defaulting to the step's."""

from __future__ import annotations

from datetime import timedelta

import pytest

from orchestrator_kafka import RetryPolicy, ValidationError, WorkflowBuilder
from orchestrator_kafka.engine import Transition

from .engine_sim import Driver, actions, audit_actions, result_event

STEP_RETRY = RetryPolicy(max_retries=5, initial_delay=1.0, backoff_factor=1.0, max_delay=1.0)
UNDO_RETRY = RetryPolicy(max_retries=1, initial_delay=7.0, backoff_factor=1.0, max_delay=7.0)


def failing_after_a(**undo: object) -> Driver:
    """Step a (timeout 30s, 5 retries of its own) with compensation ua; step b fails for good."""
    workflow = (
        WorkflowBuilder("wf")
        .add_step("a", "wa", "ua", timeout=30.0, retry=STEP_RETRY, **undo)  # type: ignore[arg-type]
        .add_step("b", "wb")
        .build()
    )
    d = Driver(workflow)
    d.start()
    d.succeed("a")
    t = d.fail("b", retryable=False)
    assert actions(t)[-1] == "compensation_dispatched"
    return d


def test_a_compensation_has_its_own_timeout_and_retry_policy() -> None:
    d = failing_after_a(compensation_timeout=5.0, compensation_retry=UNDO_RETRY)
    assert d.command("a", "compensate").body.timeout == 5.0
    timeout = d.timer("a")
    assert timeout.due_at == (d.now + timedelta(seconds=5)).timestamp()
    t = d.fire(timeout)
    assert actions(t) == ["step_timed_out", "compensation_failed_attempt", "retry_scheduled"]
    assert audit_error(t) == "timed out after 5s"
    retry = d.timer("a", "retry")
    assert retry.due_at == (d.now + timedelta(seconds=7)).timestamp()  # UNDO_RETRY's delay, not 1s
    d.fire(retry)
    t = d.fail("a", kind="compensate", attempt=2)  # UNDO_RETRY allows one retry: spent
    assert actions(t) == ["compensation_failed_attempt", "saga_failed"]


def test_without_its_own_a_compensation_takes_the_steps_timeout_and_retry_policy() -> None:
    d = failing_after_a()
    assert d.command("a", "compensate").body.timeout == 30.0
    t = d.fire(d.timer("a"))
    assert audit_error(t) == "timed out after 30s"
    retry = d.timer("a", "retry")
    assert retry.due_at == (d.now + timedelta(seconds=1)).timestamp()  # STEP_RETRY's delay
    for attempt in range(2, 7):  # STEP_RETRY: five retries
        d.fire(d.timer("a", "retry"))
        t = d.fail("a", kind="compensate", attempt=attempt)
    assert actions(t) == ["compensation_failed_attempt", "saga_failed"]


def test_only_the_timeout_or_only_the_retry_policy_may_be_its_own() -> None:
    d = failing_after_a(compensation_timeout=2.0)
    assert d.command("a", "compensate").body.timeout == 2.0
    d.fire(d.timer("a"))
    assert d.timer("a", "retry").due_at == (d.now + timedelta(seconds=1)).timestamp()
    d = failing_after_a(compensation_retry=UNDO_RETRY)
    assert d.command("a", "compensate").body.timeout == 30.0


def test_the_compensation_of_a_late_success_has_the_compensations_timeout() -> None:
    workflow = (
        WorkflowBuilder("wf")
        .add_step("a", "wa", "ua", timeout=1.0, compensation_timeout=9.0)
        .with_retry_config(max_retries=0)
        .build()
    )
    d = Driver(workflow)
    d.start()
    first = d.command("a")
    d.fire(d.timer("a"))  # attempt 1 timed out, for good: the saga gave up on it
    t = d.feed(result_event(first, result={}))
    assert actions(t) == ["late_success_compensated"]
    [(_, late)] = t.commands
    assert ":late-1" in late.body.command_id and late.body.timeout == 9.0


def test_the_builder_checks_them() -> None:
    with pytest.raises(ValidationError, match="compensation_timeout must be > 0"):
        WorkflowBuilder("wf").add_step("a", "wa", "ua", compensation_timeout=0)
    with pytest.raises(ValidationError, match="compensation_retry must be a RetryPolicy"):
        WorkflowBuilder("wf").add_step("a", "wa", "ua", compensation_retry=3)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="but no compensation"):
        WorkflowBuilder("wf").add_step("a", "wa", compensation_timeout=5.0)
    group = WorkflowBuilder("wf").add_parallel_steps(
        [{"name": "p", "worker_name": "wp", "compensation": "up", "compensation_timeout": 4.0}]
    )
    [step] = group.build().get_steps()
    assert step.timeout_of("compensate") == 4.0 and step.timeout_of("execute") is None
    # A compensation's policy is not the workflow's shape: the version stays.
    plain = WorkflowBuilder("wf").add_step("a", "wa", "ua").build()
    own = WorkflowBuilder("wf").add_step("a", "wa", "ua", compensation_timeout=3.0).build()
    assert plain.version == own.version


def audit_error(t: Transition) -> str | None:
    return next(a.error for a in audit_actions(t) if a.action == "compensation_failed_attempt")
