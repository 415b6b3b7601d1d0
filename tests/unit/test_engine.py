"""Example-based tests of the saga state machine, one or more per rule of DESIGN section 4."""

from __future__ import annotations

import copy
from datetime import timedelta
from typing import Any

import pytest

from orchestrator_kafka.constants import Topics
from orchestrator_kafka.context import StepStatus, WorkflowState
from orchestrator_kafka.engine import TimerFired, Transition, decide
from orchestrator_kafka.models import derived_event_id
from orchestrator_kafka.ports import Timer
from orchestrator_kafka.workflow import RetryPolicy, WorkflowBuilder, WorkflowDefinition

from .engine_sim import (
    RUN,
    T0,
    TX,
    Driver,
    actions,
    audit_actions,
    cancel_event,
    result_event,
    sent,
    start_event,
)


def spec_workflow(**retry: Any) -> WorkflowDefinition:
    """The API reference's compensation example."""
    return (
        WorkflowBuilder("transaction")
        .add_step("reserve", "reserve_inventory", compensation="release_inventory")
        .add_step("charge", "charge_payment", compensation="refund_payment")
        .add_step("ship", "ship_order", compensation="cancel_shipment")
        .with_retry_config(**retry)
        .build()
    )


def cmd(step: str, kind: str = "execute", attempt: int | str = 1) -> str:
    return f"{TX}:{RUN}:{step}:{kind}:{attempt}"


def ex(worker: str) -> str:
    return f"saga.commands.{worker}"


def comp(worker: str) -> str:
    return f"saga.compensations.{worker}"


def compensations_in_order(d: Driver) -> list[str]:
    """Drive a compensating saga to its end, answering each compensation with success, and return the
    compensation workers in dispatch order."""
    order: list[str] = []
    while d.saga is not None and d.saga.state is WorkflowState.COMPENSATING:
        pending = [
            c for _, c in d.commands if c.body.kind == "compensate" and ":late-" not in c.body.command_id
        ]
        current = pending[-1]
        assert d.saga.current_step == current.body.step
        order.append(current.body.worker_name)
        t = d.feed(result_event(current, result={}))
        assert t.changed
        assert len(order) < 50
    return order


# ====================================================================== sequential


def test_start_dispatches_the_first_step() -> None:
    d = Driver(spec_workflow())
    t = d.start(order_id="O-1", items=[1, 2])
    assert t.changed and t.rejected is None
    saga = t.saga
    assert saga is not None
    assert (saga.transaction_id, saga.workflow_id, saga.state, saga.version) == (
        TX,
        "transaction",
        WorkflowState.RUNNING,
        1,
    )
    assert saga.current_step == "reserve"
    assert saga.created_at == saga.updated_at == T0
    assert sent(t) == [(ex("reserve_inventory"), cmd("reserve"))]
    body = t.commands[0][1].body
    assert (body.step, body.worker_name, body.kind, body.attempt, body.timeout) == (
        "reserve",
        "reserve_inventory",
        "execute",
        1,
        None,
    )
    assert body.data == {"order_id": "O-1", "items": [1, 2]}
    assert t.commands[0][1].event_id == derived_event_id(cmd("reserve"))
    assert actions(t) == ["saga_created", "saga_started", "step_dispatched"]
    assert t.timers == () and t.cancel_timers == ()


def test_sequential_happy_path() -> None:
    d = Driver(spec_workflow())
    d.start(order_id="O-1")
    d.advance(1)
    t = d.succeed("reserve", {"reservation": "R-9"})
    assert sent(t) == [(ex("charge_payment"), cmd("charge"))]
    assert t.commands[0][1].body.data == {"order_id": "O-1", "reservation": "R-9"}
    assert actions(t) == ["step_succeeded", "step_dispatched"]
    assert d.saga is not None and d.saga.current_step == "charge" and d.saga.version == 2
    assert d.saga.updated_at == T0 + timedelta(seconds=1)

    t = d.succeed("charge", {"payment": "P-1", "order_id": "O-1-paid"})
    assert sent(t) == [(ex("ship_order"), cmd("ship"))]
    assert t.commands[0][1].body.data == {"order_id": "O-1-paid", "reservation": "R-9", "payment": "P-1"}

    t = d.succeed("ship", {"tracking": "T-7"})
    assert t.commands == ()
    assert actions(t) == ["step_succeeded", "saga_completed"]
    saga = d.saga
    assert saga.state is WorkflowState.COMPLETED and saga.state.is_final
    assert saga.current_step is None and saga.error is None
    assert saga.version == 4
    assert saga.step_results == {
        "reserve": {"reservation": "R-9"},
        "charge": {"payment": "P-1", "order_id": "O-1-paid"},
        "ship": {"tracking": "T-7"},
    }
    assert saga.get("order_id") == "O-1-paid" and saga.get("tracking") == "T-7" and saga.get("nope", 5) == 5
    status = saga.to_status()
    assert status["state"] == "completed" and status["current_step"] is None and status["error"] is None
    # Audit events carry the version they belong to and ids that are unique and stable.
    ids = [t.audit.event_id for t in d.transitions if t.audit is not None]
    assert len(ids) == len(set(ids)) == 4
    assert t.audit is not None
    assert (t.audit.body.from_state, t.audit.body.to_state) == ("running", "completed")
    assert [a.state for a in audit_actions(t)] == ["running", "completed"]


def test_decide_does_not_mutate_its_input() -> None:
    d = Driver(spec_workflow())
    d.start()
    before = d.saga
    assert before is not None
    snapshot = copy.deepcopy(before)
    t = decide(d.definition, before, result_event(d.command("reserve"), result={"x": 1}), T0)
    assert t.changed and t.saga is not before
    assert before == snapshot


def test_custom_topic_prefix() -> None:
    definition = spec_workflow()
    t = decide(definition, None, start_event(definition), T0, Topics("acme"))
    assert sent(t) == [("acme.commands.reserve_inventory", cmd("reserve"))]
    t2 = decide(
        definition, t.saga, result_event(t.commands[0][1], ok=False, retryable=False), T0, Topics("acme")
    )
    assert sent(t2) == [("acme.compensations.release_inventory", cmd("reserve", "compensate"))]


def test_result_none_counts_as_empty_dict() -> None:
    d = Driver(WorkflowBuilder("wf").add_step("a", "wa").build())
    d.start(k=1)
    t = d.feed(result_event(d.command("a"), result=None))
    assert t.saga is not None and t.saga.state is WorkflowState.COMPLETED
    assert t.saga.step_results == {"a": {}} and t.saga.data == {"k": 1}


# ====================================================================== conditional


def conditional_workflow() -> WorkflowDefinition:
    return (
        WorkflowBuilder("wf")
        .add_step("a", "wa", compensation="ua")
        .add_conditional_step("vip", "wvip", lambda ctx: ctx.get("tier") == "premium", compensation="uvip")
        .add_conditional_step("big", "wbig", lambda ctx: ctx.get("amount", 0) > 100)
        .add_step("z", "wz")
        .build()
    )


def test_false_condition_skips_the_step() -> None:
    d = Driver(conditional_workflow())
    d.start(tier="basic")
    t = d.succeed("a", {"amount": 500})  # the condition sees the data merged so far
    assert actions(t) == ["step_succeeded", "step_skipped", "step_dispatched"]
    assert audit_actions(t)[1].step == "vip"
    assert sent(t) == [(ex("wbig"), cmd("big"))]
    d.succeed("big")
    t = d.succeed("z")
    saga = t.saga
    assert saga is not None and saga.state is WorkflowState.COMPLETED
    assert set(saga.step_results) == {"a", "big", "z"}
    assert saga.step("vip").status is StepStatus.SKIPPED
    assert saga.to_status()["steps"]["vip"] == "skipped"
    assert [c.body.step for _, c in d.commands] == ["a", "big", "z"]


def test_true_condition_runs_the_step() -> None:
    d = Driver(conditional_workflow())
    d.start(tier="premium")
    t = d.succeed("a", {"amount": 1})
    assert sent(t) == [(ex("wvip"), cmd("vip"))]
    t = d.succeed("vip")
    assert actions(t) == ["step_succeeded", "step_skipped", "step_dispatched"]
    assert audit_actions(t)[1].step == "big"
    assert sent(t) == [(ex("wz"), cmd("z"))]


def test_skipped_last_steps_complete_the_saga() -> None:
    definition = (
        WorkflowBuilder("wf")
        .add_step("a", "wa")
        .add_conditional_step("vip", "wvip", lambda ctx: ctx.get("tier") == "premium")
        .add_conditional_step("big", "wbig", lambda ctx: ctx.get("amount", 0) > 100)
        .build()
    )
    d = Driver(definition)
    d.start()
    t = d.succeed("a")
    assert actions(t) == ["step_succeeded", "step_skipped", "step_skipped", "saga_completed"]
    assert t.saga is not None and t.saga.state is WorkflowState.COMPLETED and t.saga.current_step is None


def test_all_steps_skipped_completes_at_start() -> None:
    definition = WorkflowBuilder("wf").add_conditional_step("a", "wa", lambda ctx: False).build()
    t = Driver(definition).start()
    assert t.commands == ()
    assert actions(t) == ["saga_created", "step_skipped", "saga_completed"]
    assert t.saga is not None and t.saga.state is WorkflowState.COMPLETED and t.saga.version == 1


def test_skipped_step_is_not_compensated() -> None:
    d = Driver(conditional_workflow())
    d.start(tier="basic")
    d.succeed("a", {"amount": 500})
    d.fail("big", retryable=False)
    assert compensations_in_order(d) == ["ua"]
    assert d.state == "compensated"


def broken_condition_workflow() -> WorkflowDefinition:
    def broken(ctx: Any) -> bool:
        raise KeyError("tier")

    return (
        WorkflowBuilder("wf")
        .add_step("a", "wa", compensation="ua")
        .add_conditional_step("vip", "wvip", broken, compensation="uvip")
        .add_step("z", "wz")
        .build()
    )


def test_condition_that_raises_rolls_back_with_a_clear_error() -> None:
    d = Driver(broken_condition_workflow())
    d.start()
    t = d.succeed("a")
    assert "condition_failed" in actions(t) and "compensation_started" in actions(t)
    saga = t.saga
    assert saga is not None and saga.state is WorkflowState.COMPENSATING
    assert saga.error is not None and "vip" in saga.error and "KeyError" in saga.error
    assert compensations_in_order(d)[-1:] == ["ua"]
    assert d.state == "compensated"
    assert d.saga is not None and d.saga.error is not None and "KeyError" in d.saga.error
    assert all(c.body.step != "z" for _, c in d.commands)


def test_step_whose_condition_raised_is_not_compensated() -> None:
    """The step was never dispatched, so there is nothing of it to undo: only "a" is compensated."""
    d = Driver(broken_condition_workflow())
    d.start()
    d.succeed("a")
    assert compensations_in_order(d) == ["ua"]


def test_condition_that_raises_in_the_first_stage_ends_compensated_at_once() -> None:
    def divide_by_zero(ctx: Any) -> bool:
        return 1 / 0 > 0

    definition = WorkflowBuilder("wf").add_conditional_step("a", "wa", divide_by_zero).build()
    t = Driver(definition).start()
    saga = t.saga
    assert saga is not None and saga.state is WorkflowState.COMPENSATED
    assert t.commands == ()
    assert saga.error is not None and "ZeroDivisionError" in saga.error


# ====================================================================== parallel


def parallel_workflow(**step_options: Any) -> WorkflowDefinition:
    return (
        WorkflowBuilder("wf")
        .add_step("a", "wa", compensation="ua")
        .add_parallel_steps(
            [
                {"name": "p", "worker_name": "wp", "compensation": "up", **step_options},
                {"name": "q", "worker_name": "wq", "compensation": "uq", **step_options},
                {"name": "r", "worker_name": "wr", "compensation": "ur", **step_options},
            ]
        )
        .add_step("z", "wz", compensation="uz")
        .build()
    )


@pytest.mark.parametrize("order", [("p", "q", "r"), ("r", "q", "p"), ("q", "r", "p")])
def test_parallel_group_forks_and_joins(order: tuple[str, str, str]) -> None:
    d = Driver(parallel_workflow())
    d.start(base=0)
    t = d.succeed("a", {"a": 1})
    assert sent(t) == [(ex("wp"), cmd("p")), (ex("wq"), cmd("q")), (ex("wr"), cmd("r"))]
    assert all(c.body.data == {"base": 0, "a": 1} for _, c in t.commands)
    assert t.saga is not None and t.saga.current_step == "p,q,r"
    for name in order[:-1]:
        t = d.succeed(name, {name: True})
        assert t.changed and t.commands == ()
        assert t.saga is not None and t.saga.state is WorkflowState.RUNNING
    t = d.succeed(order[-1], {order[-1]: True})
    assert sent(t) == [(ex("wz"), cmd("z"))]
    assert t.commands[0][1].body.data == {"base": 0, "a": 1, "p": True, "q": True, "r": True}
    t = d.succeed("z")
    assert t.saga is not None and t.saga.state is WorkflowState.COMPLETED
    assert list(t.saga.step_results) == ["a", *order, "z"]


def test_parallel_group_at_the_end_completes_after_the_last_branch() -> None:
    definition = WorkflowBuilder("wf").add_parallel_steps(
        [{"name": "p", "worker_name": "wp"}, {"name": "q", "worker_name": "wq"}]
    )
    d = Driver(definition.build())
    t = d.start()
    assert len(t.commands) == 2 and d.state == "running"
    d.succeed("q")
    assert d.state == "running"
    assert d.succeed("p").saga.state is WorkflowState.COMPLETED  # type: ignore[union-attr]


def test_parallel_branch_failing_waits_for_the_others_then_compensates() -> None:
    d = Driver(parallel_workflow())
    d.start()
    d.succeed("a")
    d.succeed("r")
    t = d.fail("p", retryable=False)
    # No compensation yet: "q" is still running.
    assert t.commands == () and t.timers == ()
    assert d.state == "compensating"
    assert d.saga is not None and d.saga.error is not None and "'p'" in d.saga.error
    t = d.succeed("q")
    # The failed branch first, then the succeeded ones in reverse completion order, then the earlier step.
    assert sent(t) == [(comp("up"), cmd("p", "compensate"))]
    assert compensations_in_order(d) == ["up", "uq", "ur", "ua"]
    assert d.state == "compensated"
    assert all(c.body.step != "z" for _, c in d.commands)


def test_parallel_branch_still_running_is_not_retried_after_another_fails() -> None:
    d = Driver(parallel_workflow())
    d.start()
    d.succeed("a")
    d.fail("p", retryable=False)
    d.succeed("r")
    t = d.fail("q")  # retryable, but the saga is already rolling back
    assert [tm.kind for tm in t.timers] == []
    assert sent(t) == [(comp("uq"), cmd("q", "compensate"))]
    # Failed branches in reverse definition order, then the completed ones.
    assert compensations_in_order(d) == ["uq", "up", "ur", "ua"]


def test_parallel_branch_waiting_to_retry_is_failed_and_compensated_first() -> None:
    d = Driver(parallel_workflow())
    d.start()
    d.succeed("a")
    d.fail("q")  # q waits to retry
    retry_timer = d.timer("q", "retry")
    d.succeed("p")
    t = d.fail("r", retryable=False)
    assert retry_timer.timer_id in t.cancel_timers
    # Nothing is in flight any more: compensation starts at once, failed branches first.
    assert sent(t) == [(comp("ur"), cmd("r", "compensate"))]
    assert compensations_in_order(d) == ["ur", "uq", "up", "ua"]
    assert d.timers == {}
    assert d.fire(retry_timer).changed is False  # the cancelled retry, should it fire anyway


def test_parallel_branch_timing_out_while_awaited_ends_the_wait() -> None:
    d = Driver(parallel_workflow(timeout=5))
    d.start()
    d.succeed("a")
    d.succeed("p")
    d.fail("q", retryable=False)
    t = d.fire(d.timer("r"))  # r never answers
    assert "step_timed_out" in actions(t)
    assert [tm.kind for tm in t.timers] == ["timeout"]  # the compensation's own timeout, no retry
    # Failed branches in reverse definition order, then the succeeded one, then the earlier step.
    assert compensations_in_order(d) == ["ur", "uq", "up", "ua"]


# ====================================================================== retries


def test_failure_is_retried_with_backoff_then_rolls_back() -> None:
    d = Driver(spec_workflow(max_retries=3, backoff_factor=3.0, initial_delay=2.0, max_delay=10.0))
    d.start()
    delays = []
    for attempt in (1, 2, 3):
        t = d.fail("reserve", attempt=attempt)
        assert t.changed and t.commands == ()
        assert actions(t) == ["step_failed", "retry_scheduled"]
        assert d.saga is not None and d.saga.state is WorkflowState.RUNNING
        assert d.saga.step("reserve").status is StepStatus.RETRY_WAIT
        (timer,) = t.timers
        assert (timer.kind, timer.step, timer.phase, timer.attempt) == (
            "retry",
            "reserve",
            "execute",
            attempt + 1,
        )
        assert timer.transaction_id == TX
        delays.append(timer.due_at - d.now.timestamp())
        t = d.fire(timer)
        assert sent(t) == [(ex("reserve_inventory"), cmd("reserve", attempt=attempt + 1))]
        assert t.commands[0][1].body.attempt == attempt + 1
    assert delays == [2.0, 6.0, 10.0]  # initial * factor ** (n - 1), capped at max_delay
    t = d.fail("reserve", attempt=4)
    assert t.timers == ()
    assert d.state == "compensating"
    assert compensations_in_order(d) == ["release_inventory"]
    assert d.state == "compensated"
    assert d.saga is not None and d.saga.error is not None and "'reserve'" in d.saga.error


def test_default_policy_makes_four_attempts() -> None:
    d = Driver(WorkflowBuilder("wf").add_step("a", "wa").build())
    d.start()
    attempts = 0
    while d.state == "running":
        attempts += 1
        t = d.fail("a")
        if t.timers:
            d.fire(t.timers[0])
    assert attempts == 4 and d.state == "compensated"


def test_step_retry_policy_overrides_the_workflow_default() -> None:
    definition = (
        WorkflowBuilder("wf")
        .add_step("a", "wa", retry=RetryPolicy(max_retries=1, initial_delay=7.0, max_delay=7.0))
        .with_retry_config(max_retries=5)
        .build()
    )
    d = Driver(definition)
    d.start()
    t = d.fail("a")
    assert t.timers[0].due_at == d.now.timestamp() + 7.0
    d.fire(t.timers[0])
    t = d.fail("a", attempt=2)
    assert t.timers == () and d.state == "compensated"


def test_zero_retries_rolls_back_on_the_first_failure() -> None:
    d = Driver(spec_workflow(max_retries=0))
    d.start()
    d.succeed("reserve")
    t = d.fail("charge")
    assert t.timers == ()
    assert sent(t) == [(comp("refund_payment"), cmd("charge", "compensate"))]


def test_non_retryable_failure_is_not_retried() -> None:
    d = Driver(spec_workflow(max_retries=5))
    d.start()
    t = d.fail("reserve", retryable=False)
    assert t.timers == ()
    assert "retry_scheduled" not in actions(t)
    assert sent(t) == [(comp("release_inventory"), cmd("reserve", "compensate"))]


def test_many_retries_with_a_low_cap_never_crash_the_engine() -> None:
    # Retry every second for a long time: the backoff must be capped, not overflow a float.
    definition = (
        WorkflowBuilder("wf")
        .add_step(
            "a",
            "wa",
            retry=RetryPolicy(max_retries=400, backoff_factor=10.0, initial_delay=1.0, max_delay=1.0),
        )
        .build()
    )
    d = Driver(definition)
    d.start()
    for attempt in range(1, 401):
        t = d.fail("a", attempt=attempt)
        assert t.timers[0].due_at == d.now.timestamp() + 1.0
        d.fire(t.timers[0])
    d.succeed("a", attempt=401)
    assert d.state == "completed"


# ====================================================================== timeouts


def timeout_workflow(**retry: Any) -> WorkflowDefinition:
    return (
        WorkflowBuilder("wf")
        .add_step("a", "wa", compensation="ua", timeout=5)
        .add_step("b", "wb", compensation="ub", timeout=2.5)
        .with_retry_config(**retry)
        .build()
    )


def test_timeout_timer_is_set_at_dispatch_and_cancelled_by_the_result() -> None:
    d = Driver(timeout_workflow())
    t = d.start()
    (timer,) = t.timers
    assert (timer.kind, timer.step, timer.phase, timer.attempt, timer.command_id) == (
        "timeout",
        "a",
        "execute",
        1,
        cmd("a"),
    )
    assert timer.due_at == T0.timestamp() + 5
    assert t.commands[0][1].body.timeout == 5.0
    d.advance(1)
    t = d.succeed("a")
    assert t.cancel_timers == (timer.timer_id,)
    (timer_b,) = t.timers
    assert timer_b.step == "b" and timer_b.due_at == d.now.timestamp() + 2.5
    # The timeout of "a", fired anyway (already claimed), changes nothing.
    stale = d.fire(timer)
    assert stale.changed is False and stale.note == "stale timer"


def test_timeout_while_awaited_is_a_failed_attempt_and_is_retried() -> None:
    d = Driver(timeout_workflow(initial_delay=3.0))
    d.start()
    t = d.fire(d.timer("a"))
    assert actions(t) == ["step_timed_out", "step_failed", "retry_scheduled"]
    assert d.saga is not None and "timed out" in (d.saga.step("a").error or "")
    (retry,) = t.timers
    assert retry.kind == "retry" and retry.attempt == 2 and retry.due_at == d.now.timestamp() + 3.0
    t = d.fire(retry)
    assert sent(t) == [(ex("wa"), cmd("a", attempt=2))]
    assert [tm.kind for tm in t.timers] == ["timeout"] and t.timers[0].command_id == cmd("a", attempt=2)


def test_timeout_of_the_last_attempt_rolls_back() -> None:
    d = Driver(timeout_workflow(max_retries=0))
    d.start()
    d.succeed("a")
    t = d.fire(d.timer("b"))
    assert d.saga is not None and d.saga.error is not None and "timed out" in d.saga.error
    # The timed-out step's outcome is unknown: its own compensation runs first.
    assert sent(t) == [(comp("ub"), cmd("b", "compensate"))]
    assert compensations_in_order(d) == ["ub", "ua"]


def test_stale_timers_change_nothing() -> None:
    d = Driver(timeout_workflow())
    d.start()
    made_up = Timer("nope", TX, 0.0, "timeout", "a", "execute", 1, cmd("a"))
    assert d.feed(TimerFired(made_up)).changed is False
    unknown_step = Timer("x", TX, 0.0, "retry", "zzz", "execute", 2)
    assert d.feed(TimerFired(unknown_step)).changed is False
    timer = d.timer("a")
    d.succeed("a")
    d.succeed("b")
    assert d.state == "completed"
    assert d.feed(TimerFired(timer)).changed is False


# ====================================================================== compensation


def test_spec_example_compensation_order() -> None:
    d = Driver(spec_workflow())
    d.start()
    d.succeed("reserve")
    d.succeed("charge")
    t = d.fail("ship", retryable=False)
    assert actions(t) == ["step_failed", "compensation_started", "compensation_dispatched"]
    assert d.saga is not None and d.saga.state is WorkflowState.COMPENSATING
    assert d.saga.current_step == "ship"
    assert sent(t) == [(comp("cancel_shipment"), cmd("ship", "compensate"))]
    body = t.commands[0][1].body
    assert (body.kind, body.worker_name, body.attempt) == ("compensate", "cancel_shipment", 1)
    t = d.succeed("ship", kind="compensate")
    assert sent(t) == [(comp("refund_payment"), cmd("charge", "compensate"))]
    assert d.saga.current_step == "charge"
    t = d.succeed("charge", kind="compensate")
    assert sent(t) == [(comp("release_inventory"), cmd("reserve", "compensate"))]
    t = d.succeed("reserve", kind="compensate")
    assert t.commands == ()
    assert actions(t) == ["compensation_succeeded", "saga_compensated"]
    saga = d.saga
    assert saga.state is WorkflowState.COMPENSATED and saga.current_step is None
    assert saga.error is not None and "'ship'" in saga.error
    assert [saga.step(s).status for s in ("reserve", "charge", "ship")] == [StepStatus.COMPENSATED] * 3


def test_steps_without_compensation_are_left_out() -> None:
    definition = (
        WorkflowBuilder("wf")
        .add_step("reserve", "reserve_inventory", compensation="release_inventory")
        .add_step("validate", "validate")
        .add_step("charge", "charge_payment", compensation="refund_payment")
        .add_step("ship", "ship_order")
        .build()
    )
    d = Driver(definition)
    d.start()
    for step in ("reserve", "validate", "charge"):
        d.succeed(step)
    d.fail("ship", retryable=False)
    assert compensations_in_order(d) == ["refund_payment", "release_inventory"]
    assert d.state == "compensated"


def test_nothing_to_compensate_ends_compensated_at_once() -> None:
    definition = WorkflowBuilder("wf").add_step("a", "wa").add_step("b", "wb").build()
    d = Driver(definition)
    d.start()
    d.succeed("a")
    t = d.fail("b", retryable=False)
    assert t.commands == ()
    assert actions(t) == ["step_failed", "compensation_started", "saga_compensated"]
    assert d.state == "compensated"


def test_compensation_is_retried_then_fails_the_saga() -> None:
    d = Driver(spec_workflow(max_retries=2, initial_delay=1.0, backoff_factor=2.0))
    d.start()
    d.succeed("reserve")
    d.fail("charge", retryable=False)
    assert d.command("charge", "compensate").body.worker_name == "refund_payment"
    for attempt in (1, 2):
        t = d.fail("charge", kind="compensate", attempt=attempt)
        (timer,) = t.timers
        assert (timer.kind, timer.phase, timer.attempt) == ("retry", "compensate", attempt + 1)
        assert timer.due_at == d.now.timestamp() + 2.0 ** (attempt - 1)
        assert d.saga is not None and d.saga.step("charge").status is StepStatus.COMPENSATION_RETRY_WAIT
        t = d.fire(timer)
        assert sent(t) == [(comp("refund_payment"), cmd("charge", "compensate", attempt + 1))]
    t = d.fail("charge", kind="compensate", attempt=3)
    assert t.commands == () and t.timers == ()
    saga = d.saga
    assert saga is not None and saga.state is WorkflowState.FAILED and saga.current_step is None
    assert saga.error is not None and "compensation of step 'charge' failed" in saga.error
    assert saga.step("charge").status is StepStatus.COMPENSATION_FAILED
    # release_inventory is never sent: the saga needs an operator.
    assert all(c.body.worker_name != "release_inventory" for _, c in d.commands)
    assert d.cancel().rejected is not None


def test_compensation_retry_then_success_continues_the_rollback() -> None:
    d = Driver(spec_workflow(max_retries=1))
    d.start()
    d.succeed("reserve")
    d.fail("charge", retryable=False)
    t = d.fail("charge", kind="compensate")
    d.fire(t.timers[0])
    t = d.succeed("charge", kind="compensate", attempt=2)
    assert sent(t) == [(comp("release_inventory"), cmd("reserve", "compensate"))]


def test_non_retryable_compensation_failure_fails_the_saga_at_once() -> None:
    d = Driver(spec_workflow(max_retries=3))
    d.start()
    d.fail("reserve", retryable=False)
    t = d.fail("reserve", kind="compensate", retryable=False)
    assert t.timers == () and d.state == "failed"


def test_compensation_timeout_is_a_failed_compensation_attempt() -> None:
    d = Driver(timeout_workflow(max_retries=1))
    d.start()
    d.succeed("a")
    d.fail("b", retryable=False)
    t = d.fire(d.timer("b"))  # the compensation's timeout
    assert [tm.kind for tm in t.timers] == ["retry"] and t.timers[0].phase == "compensate"
    d.fire(t.timers[0])
    t = d.fire(d.timer("b"))
    assert d.state == "failed"


def test_stale_compensation_results_change_nothing() -> None:
    d = Driver(spec_workflow(max_retries=1))
    d.start()
    d.fail("reserve", retryable=False)
    first = d.command("reserve", "compensate")
    d.fail("reserve", kind="compensate")
    assert d.feed(result_event(first, ok=False)).changed is False  # a duplicate failure
    retry = d.timer("reserve", "retry")
    # A success of the earlier attempt while the retry waits is taken: the compensation is done.
    adopted = d.feed(result_event(first, result={}))
    assert adopted.changed is True and retry.timer_id in adopted.cancel_timers
    assert d.state == "compensated"
    assert d.feed(result_event(first, result={})).changed is False


def test_a_failed_compensation_is_retried_when_no_late_success_comes() -> None:
    d = Driver(spec_workflow(max_retries=1))
    d.start()
    d.fail("reserve", retryable=False)
    first = d.command("reserve", "compensate")
    d.fail("reserve", kind="compensate")
    assert d.feed(result_event(first, ok=False)).changed is False  # a duplicate failure
    d.fire(d.timer("reserve", "retry"))
    d.succeed("reserve", kind="compensate", attempt=2)
    assert d.state == "compensated"
    assert d.feed(result_event(first, result={})).changed is False


# ====================================================================== cancellation


def test_cancel_compensates_in_flight_then_completed_steps() -> None:
    d = Driver(spec_workflow())
    d.start()
    d.succeed("reserve")
    t = d.cancel("customer asked")
    assert actions(t) == ["cancel_requested", "compensation_dispatched"]
    # The in-flight step first: its outcome is unknown.
    assert sent(t) == [(comp("refund_payment"), cmd("charge", "compensate"))]
    assert d.saga is not None and d.saga.state is WorkflowState.COMPENSATING
    assert d.saga.error == "customer asked"
    assert compensations_in_order(d) == ["refund_payment", "release_inventory"]
    saga = d.saga
    assert saga.state is WorkflowState.CANCELLED and saga.error == "customer asked"
    assert saga.current_step is None
    assert actions(d.transitions[-1])[-1] == "saga_cancelled"


def test_cancel_without_reason_says_so() -> None:
    d = Driver(spec_workflow())
    d.start()
    d.cancel()
    assert d.saga is not None and d.saga.error == "cancelled by request"


def test_cancel_in_a_parallel_stage_does_not_wait_for_the_branches() -> None:
    d = Driver(parallel_workflow(timeout=5))
    d.start()
    d.succeed("a")
    d.succeed("q")
    d.fail("r")  # r waits to retry
    timers = {d.timer("p").timer_id, d.timer("r", "retry").timer_id}
    t = d.cancel()
    assert set(t.cancel_timers) == timers
    assert sent(t) == [(comp("ur"), cmd("r", "compensate"))]
    assert compensations_in_order(d) == ["ur", "up", "uq", "ua"]
    assert d.state == "cancelled"
    assert d.timers == {}


def test_cancel_with_nothing_to_compensate_is_immediate() -> None:
    d = Driver(WorkflowBuilder("wf").add_step("a", "wa").add_step("b", "wb").build())
    d.start()
    d.succeed("a")
    t = d.cancel()
    assert t.commands == () and d.state == "cancelled"
    assert actions(t) == ["cancel_requested", "saga_cancelled"]
    # The in-flight step's result, when it comes, changes nothing.
    assert d.succeed("b").changed is False


@pytest.mark.parametrize("state", ["compensating", "completed", "compensated", "cancelled", "failed"])
def test_cancel_is_rejected_when_compensating_or_final(state: str) -> None:
    d = Driver(spec_workflow(max_retries=0))
    d.start()
    if state == "completed":
        for step in ("reserve", "charge", "ship"):
            d.succeed(step)
    elif state == "cancelled":
        d.cancel()
        d.succeed("reserve", kind="compensate")
    else:
        d.fail("reserve")
        if state == "compensated":
            d.succeed("reserve", kind="compensate")
        elif state == "failed":
            d.fail("reserve", kind="compensate")
    assert d.state == state
    before = d.saga
    t = d.cancel()
    assert t.changed is False and t.rejected is not None and state in t.rejected
    assert t.saga == before


def test_late_success_after_cancel() -> None:
    d = Driver(spec_workflow())
    d.start()
    d.succeed("reserve")
    charge = d.command("charge")
    d.cancel()
    # charge's compensation is in flight: a success that lands now may have come after it ran.
    t = d.feed(result_event(charge, result={"paid": True}))
    assert sent(t) == [(comp("refund_payment"), cmd("charge", "compensate", "late-1.1"))]
    assert t.saga is not None and "paid" not in t.saga.step_results.get("charge", {})
    assert d.feed(result_event(charge, result={"paid": True})).changed is False


# ====================================================================== duplicates, stale and late results


def test_duplicate_result_changes_nothing() -> None:
    d = Driver(spec_workflow())
    d.start()
    first = result_event(d.command("reserve"), result={"x": 1})
    d.feed(first)
    before = d.saga
    t = d.feed(first)
    assert t.changed is False and t.note == "duplicate result" and t.saga == before
    again = result_event(d.command("reserve"), result={"x": 2})  # the worker ran it twice
    assert d.feed(again).changed is False
    assert d.saga is not None and d.saga.step_results["reserve"] == {"x": 1}


def test_duplicate_failure_changes_nothing() -> None:
    d = Driver(spec_workflow())
    d.start()
    failure = result_event(d.command("reserve"), ok=False)
    d.feed(failure)
    t = d.feed(failure)
    assert t.changed is False
    assert len(d.timers) == 1


def test_stale_failure_of_an_old_attempt_changes_nothing() -> None:
    d = Driver(timeout_workflow())
    d.start()
    first = d.command("a")
    d.fire(d.timer("a"))
    d.fire(d.timer("a", "retry"))
    before = d.saga
    t = d.feed(result_event(first, ok=False))
    assert t.changed is False and t.note == "stale result" and t.saga == before


def test_late_success_is_adopted_while_waiting_to_retry() -> None:
    d = Driver(timeout_workflow())
    d.start()
    first = d.command("a")
    d.fire(d.timer("a"))
    retry = d.timer("a", "retry")
    t = d.feed(result_event(first, result={"late": True}))
    assert t.cancel_timers == (retry.timer_id,)
    assert sent(t) == [(ex("wb"), cmd("b"))]
    assert t.saga is not None and t.saga.step_results["a"] == {"late": True}
    assert d.fire(retry).changed is False


def test_late_success_is_adopted_while_another_attempt_runs() -> None:
    d = Driver(timeout_workflow())
    d.start()
    first = d.command("a")
    d.fire(d.timer("a"))
    d.fire(d.timer("a", "retry"))
    timeout_2 = d.timer("a")
    assert timeout_2.attempt == 2
    t = d.feed(result_event(first, result={"late": True}))
    assert timeout_2.timer_id in t.cancel_timers
    assert sent(t) == [(ex("wb"), cmd("b"))]


def test_late_success_of_a_failed_step_whose_compensation_is_queued_changes_nothing() -> None:
    d = Driver(parallel_workflow(timeout=5))
    d.start()
    d.succeed("a")
    p1 = d.command("p")
    d.fire(d.timer("p"))  # p times out, waits to retry
    d.fail("q", retryable=False)  # rollback: p is failed, r still runs
    t = d.feed(result_event(p1, result={}))
    assert t.changed is False and t.note == "compensation pending"
    d.succeed("r")
    assert compensations_in_order(d) == ["uq", "up", "ur", "ua"]


def test_late_success_after_rollback_gets_one_extra_compensation() -> None:
    d = Driver(timeout_workflow(max_retries=0))
    d.start()
    d.succeed("a")
    b1 = d.command("b")
    d.fire(d.timer("b"))  # b times out for good; its compensation is dispatched
    assert d.command("b", "compensate").body.command_id == cmd("b", "compensate")
    late = result_event(b1, result={"b": "done"})
    t = d.feed(late)
    assert actions(t) == ["late_success_compensated"]
    assert sent(t) == [(comp("ub"), cmd("b", "compensate", "late-1.1"))]
    assert t.commands[0][1].body.kind == "compensate"
    assert t.saga is not None and "b" not in t.saga.step_results
    assert t.saga.state is WorkflowState.COMPENSATING
    # The same late success again (redelivered, or the worker ran it twice) changes nothing.
    assert d.feed(late).changed is False
    assert d.feed(result_event(b1, result={"b": "done"})).changed is False
    assert compensations_in_order(d) == ["ub", "ua"]
    assert d.state == "compensated"
    # After the end, still nothing new.
    assert d.feed(late).changed is False


def test_late_success_after_the_saga_ended_is_compensated() -> None:
    d = Driver(timeout_workflow(max_retries=0))
    d.start()
    a1 = d.command("a")
    d.fire(d.timer("a"))
    d.succeed("a", kind="compensate")
    assert d.state == "compensated"
    t = d.feed(result_event(a1, result={}))
    assert sent(t) == [(comp("ua"), cmd("a", "compensate", "late-1.1"))]
    assert t.saga is not None and t.saga.state is WorkflowState.COMPENSATED
    assert d.feed(result_event(a1, result={})).changed is False


def test_late_success_of_a_step_without_compensation_changes_nothing() -> None:
    definition = WorkflowBuilder("wf").add_step("a", "wa", timeout=1).with_retry_config(max_retries=0).build()
    d = Driver(definition)
    d.start()
    a1 = d.command("a")
    d.fire(d.timer("a"))
    assert d.state == "compensated"
    assert d.feed(result_event(a1, result={})).changed is False


def test_another_attempts_success_while_the_step_success_stands_changes_nothing() -> None:
    """Attempts of a step are retries of one operation and a compensation undoes the step, not one
    attempt: while the step's counted success stands, compensating another attempt's success would undo
    the counted one too. So it changes nothing (the step's own compensation covers it on a rollback)."""
    d = Driver(timeout_workflow())
    d.start()
    a1 = d.command("a")
    d.fire(d.timer("a"))
    d.fire(d.timer("a", "retry"))
    d.succeed("a", {"n": 2}, attempt=2)
    t = d.feed(result_event(a1, result={"n": 1}))
    assert t.changed is False
    assert d.saga is not None and d.saga.step_results["a"] == {"n": 2} and d.saga.get("n") == 2


def test_another_attempts_success_after_the_step_was_compensated_is_compensated() -> None:
    d = Driver(timeout_workflow())
    d.start()
    a1 = d.command("a")
    d.fire(d.timer("a"))
    d.fire(d.timer("a", "retry"))
    d.succeed("a", {"n": 2}, attempt=2)
    d.fail("b", retryable=False)
    assert compensations_in_order(d) == ["ub", "ua"]
    # Attempt 1's success lands after "a" was compensated: its effect may post-date the compensation.
    t = d.feed(result_event(a1, result={"n": 1}))
    assert sent(t) == [(comp("ua"), cmd("a", "compensate", "late-1.1"))]
    # The counted success, redelivered, was undone by the rollback already.
    assert d.succeed("a", {"n": 2}, attempt=2).changed is False


def test_adopted_late_success_is_the_one_counted() -> None:
    """Attempt 1 is adopted while attempt 2 runs. Later, after the step was compensated, a duplicate of
    attempt 1 (the counted success, already undone by the rollback) must change nothing, while attempt 2's
    own success (abandoned, never counted) must get its extra compensation."""
    d = Driver(timeout_workflow())
    d.start()
    a1 = d.command("a")
    d.fire(d.timer("a"))
    d.fire(d.timer("a", "retry"))
    a2 = d.command("a", attempt=2)
    d.feed(result_event(a1, result={"n": 1}))  # adopted
    assert d.saga is not None and d.saga.step_results["a"] == {"n": 1}
    d.fail("b", retryable=False)
    assert compensations_in_order(d) == ["ub", "ua"]
    assert d.state == "compensated"
    assert d.feed(result_event(a1, result={"n": 1})).changed is False
    t = d.feed(result_event(a2, result={"n": 2}))
    assert sent(t) == [(comp("ua"), cmd("a", "compensate", "late-2.1"))]


def ended_with_a_late_success(**retry: Any) -> tuple[Driver, Transition]:
    """A compensated saga whose step "a" then reports the late success of its abandoned attempt 1."""
    d = Driver(timeout_workflow(**retry))
    d.start()
    a1 = d.command("a")
    d.fire(d.timer("a"))
    if any(t.kind == "retry" for t in d.timers.values()):
        d.fire(d.timer("a", "retry"))
        d.fail("a", retryable=False, attempt=2)
    d.succeed("a", kind="compensate")
    assert d.state == "compensated"
    t = d.feed(result_event(a1, result={}))
    assert sent(t) == [(comp("ua"), cmd("a", "compensate", "late-1.1"))]
    return d, t


def test_a_failed_late_compensation_is_retried_under_new_command_ids() -> None:
    d, _ = ended_with_a_late_success(max_retries=2, initial_delay=1.0, backoff_factor=2.0)
    assert {t.timer_id for t in d.timers.values()} == {cmd("a", "compensate", "late-1.1") + ":timeout"}
    t = d.fail("a", kind="compensate", attempt="late-1.1")
    assert actions(t) == ["late_compensation_failed_attempt", "late_compensation_retry_scheduled"]
    retry = d.timer("a", "retry")
    assert (retry.phase, retry.attempt, retry.due_at - d.now.timestamp()) == ("compensate", 2, 1.0)
    assert t.cancel_timers == (cmd("a", "compensate", "late-1.1") + ":timeout",)
    t = d.fire(retry)
    assert actions(t) == ["late_compensation_dispatched"]
    assert sent(t) == [(comp("ua"), cmd("a", "compensate", "late-1.2"))]
    assert t.commands[0][1].body.attempt == 2
    # A second answer to attempt 1 is stale now; attempt 2's success settles it.
    assert d.fail("a", kind="compensate", attempt="late-1.1").changed is False
    t = d.succeed("a", kind="compensate", attempt="late-1.2")
    assert actions(t) == ["late_compensation_succeeded"]
    assert t.saga is not None and t.saga.state is WorkflowState.COMPENSATED and t.saga.late_runs == {}
    assert d.timers == {}
    assert d.succeed("a", kind="compensate", attempt="late-1.2").changed is False


def test_a_late_compensation_that_times_out_is_retried() -> None:
    d, _ = ended_with_a_late_success(max_retries=1)
    t = d.fire(d.timer("a"))
    assert actions(t) == [
        "late_compensation_timed_out",
        "late_compensation_failed_attempt",
        "late_compensation_retry_scheduled",
    ]
    d.fire(d.timer("a", "retry"))
    assert d.command("a", "compensate").body.command_id == cmd("a", "compensate", "late-1.2")


def test_an_earlier_late_attempts_success_settles_it_while_it_waits_to_retry() -> None:
    d, _ = ended_with_a_late_success(max_retries=1)
    d.fail("a", kind="compensate", attempt="late-1.1")
    t = d.succeed("a", kind="compensate", attempt="late-1.1")
    assert actions(t) == ["late_compensation_succeeded"]
    assert t.cancel_timers == (cmd("a", "compensate", "late-1.2") + ":retry",)
    assert d.timers == {} and d.state == "compensated"


def test_an_earlier_late_attempts_success_settles_it_while_the_next_runs() -> None:
    d, _ = ended_with_a_late_success(max_retries=1)
    d.fail("a", kind="compensate", attempt="late-1.1")
    d.fire(d.timer("a", "retry"))
    assert d.command("a", "compensate").body.command_id == cmd("a", "compensate", "late-1.2")
    t = d.succeed("a", kind="compensate", attempt="late-1.1")
    assert actions(t) == ["late_compensation_succeeded"]
    assert t.cancel_timers == (cmd("a", "compensate", "late-1.2") + ":timeout",)
    assert d.saga is not None and d.saga.late_runs == {} and d.timers == {}
    assert d.succeed("a", kind="compensate", attempt="late-1.2").changed is False


def test_results_that_only_look_like_a_late_attempt_change_nothing() -> None:
    d, _ = ended_with_a_late_success(max_retries=2)
    d.fail("a", kind="compensate", attempt="late-1.1")
    d.fire(d.timer("a", "retry"))
    base = cmd("a", "compensate", "late-1")
    real = d.command("a", "compensate", "late-1.2")
    for forged in (base, f"{base}.02", f"{base}.\u00b2", f"{base}.3", f"{base}.2.2", f"{base}x"):
        body = real.body.model_copy(update={"command_id": forged})
        assert d.feed(result_event(real.model_copy(update={"body": body}), result={})).changed is False
    assert d.succeed("a", kind="compensate", attempt="late-1.2").changed is True


def test_a_late_success_of_a_given_up_compensation_during_the_rollback_saves_the_saga() -> None:
    d = Driver(timeout_workflow(max_retries=0))
    d.start()
    d.succeed("a")
    b1 = d.command("b")
    d.fire(d.timer("b"))
    d.feed(result_event(b1, result={}))
    late_timeout = cmd("b", "compensate", "late-1.1") + ":timeout"
    d.fire(d.timers[late_timeout])  # the late compensation times out, with no retries: it gives up
    assert d.saga is not None and d.saga.late_runs[cmd("b", "compensate", "late-1")].failed
    t = d.succeed("b", kind="compensate", attempt="late-1.1")  # it did undo it, after all
    assert actions(t) == ["late_compensation_succeeded"]
    assert compensations_in_order(d) == ["ub", "ua"]
    assert d.state == "compensated"


def test_a_late_compensation_that_fails_for_good_fails_the_ended_saga() -> None:
    d, _ = ended_with_a_late_success(max_retries=0)
    t = d.fail("a", kind="compensate", attempt="late-1.1")
    assert actions(t) == ["late_compensation_failed_attempt", "late_compensation_failed", "saga_failed"]
    saga = t.saga
    assert saga is not None and saga.state is WorkflowState.FAILED
    assert saga.error is not None and saga.error.endswith(
        "the compensation of a late success of step 'a' failed: Boom: it broke"
    )
    assert saga.late_runs[cmd("a", "compensate", "late-1")].failed
    assert d.timers == {}


def test_a_late_compensation_that_fails_for_good_during_the_rollback_fails_it_at_the_end() -> None:
    d = Driver(timeout_workflow(max_retries=0))
    d.start()
    d.succeed("a")
    b1 = d.command("b")
    d.fire(d.timer("b"))  # b times out for good: its compensation, then a's
    d.feed(result_event(b1, result={}))  # b's late success: an extra compensation
    t = d.fail("b", kind="compensate", attempt="late-1.1", retryable=False)
    assert actions(t) == ["late_compensation_failed_attempt", "late_compensation_failed"]
    assert d.state == "compensating"  # the rollback goes on
    assert compensations_in_order(d) == ["ub", "ua"]
    assert d.state == "failed"
    assert d.saga is not None and d.saga.error is not None
    assert d.saga.error.startswith(
        "step 'b' failed: timed out after 2.5s; the compensation of a late success"
    )


def test_result_for_an_unknown_step_changes_nothing() -> None:
    d = Driver(spec_workflow())
    d.start()
    forged = d.command("reserve").body.model_copy(update={"step": "nope", "command_id": cmd("nope")})
    t = d.feed(result_event(forged, workflow_id="transaction"))
    assert t.changed is False and "no step 'nope'" in t.note


def test_result_for_a_step_not_yet_reached_changes_nothing() -> None:
    d = Driver(spec_workflow())
    d.start()
    early = d.command("reserve").body.model_copy(update={"step": "ship", "command_id": cmd("ship")})
    t = d.feed(result_event(early, workflow_id="transaction", ok=False))
    assert t.changed is False and t.note == "stale result"


def test_unchanged_transitions_return_the_input_saga() -> None:
    """Transition's contract: ``saga`` is the input object when ``changed`` is false."""
    d = Driver(spec_workflow())
    d.start()
    before = d.saga
    reserve = d.command("reserve")
    early = reserve.body.model_copy(update={"step": "ship", "command_id": cmd("ship")})
    stale_timer = TimerFired(Timer("nope", TX, 0.0, "retry", "reserve", "execute", 2))
    for event in (
        result_event(early, workflow_id="transaction", ok=False),  # a step not reached yet
        stale_timer,
        start_event(d.definition),
    ):
        t = d.feed(event)
        assert t.changed is False
        assert t.saga is before, f"{type(event).__name__}: {t.note}"


def test_start_of_an_existing_saga_changes_nothing() -> None:
    d = Driver(spec_workflow())
    d.start(x=1)
    before = d.saga
    t = d.feed(start_event(d.definition, {"x": 2}))
    assert t.changed is False and t.saga is before and t.note == "already started"


@pytest.mark.parametrize("kind", ["result", "cancel", "timer"])
def test_events_for_an_unknown_saga_change_nothing(kind: str) -> None:
    definition = spec_workflow()
    t0 = decide(definition, None, start_event(definition), T0)
    event: Any = {
        "result": result_event(t0.commands[0][1], result={}),
        "cancel": cancel_event(definition),
        "timer": TimerFired(Timer("t", TX, 0.0, "retry", "reserve", "execute", 2)),
    }[kind]
    t = decide(definition, None, event, T0)
    assert t == Transition(None, False, note="unknown saga")


def test_command_ids_are_unique_and_audit_versions_follow_the_saga() -> None:
    d = Driver(parallel_workflow(timeout=5))
    d.start()
    d.succeed("a")
    d.fire(d.timer("p"))
    d.fire(d.timer("p", "retry"))
    d.succeed("p", attempt=2)
    d.succeed("q")
    d.fail("r", retryable=False)
    compensations_in_order(d)
    ids = [c.body.command_id for _, c in d.commands]
    assert len(ids) == len(set(ids))
    versions = [t.saga.version for t in d.transitions if t.changed and t.saga is not None]
    assert versions == list(range(1, len(versions) + 1))


def test_a_success_for_a_command_never_sent_changes_nothing() -> None:
    d = Driver(spec_workflow())
    d.start()
    sent_one = d.command("reserve").body
    for forged in (
        sent_one.model_copy(update={"command_id": "tx-1:reserve:execute:7", "attempt": 7}),  # never sent
        sent_one.model_copy(update={"command_id": "someone-else:reserve:execute:1"}),
        sent_one.model_copy(update={"command_id": "tx-1:reserve:compensate:1", "kind": "compensate"}),
    ):
        t = d.feed(result_event(forged, workflow_id="transaction"))
        assert t.changed is False and t.note == "unknown command"
    assert d.saga is not None and d.saga.step("reserve").status.value == "running"


def test_each_start_gets_its_own_run_id_in_every_command_id() -> None:
    first = Driver(spec_workflow())
    first.start()
    again = Driver(spec_workflow())
    again.advance(60)  # the same transaction id and start event id, started again later
    again.start()
    assert first.saga is not None and again.saga is not None
    assert first.saga.run_id == RUN and again.saga.run_id not in ("", RUN)
    assert first.command("reserve").body.command_id == f"{TX}:{RUN}:reserve:execute:1"
    assert again.command("reserve").body.command_id == f"{TX}:{again.saga.run_id}:reserve:execute:1"


def test_a_saga_stored_before_run_ids_keeps_its_command_ids() -> None:
    d = Driver(spec_workflow())
    d.start()
    assert d.saga is not None
    legacy = f"{TX}:reserve:execute:1"
    d.saga.run_id = ""  # as an orchestrator before run ids stored it
    d.saga.step("reserve").command_id = legacy
    sent_before = d.command("reserve")
    body = sent_before.body.model_copy(update={"command_id": legacy})
    t = d.feed(result_event(sent_before.model_copy(update={"body": body})))
    assert actions(t) == ["step_succeeded", "step_dispatched"]
    assert d.command("charge").body.command_id == f"{TX}:charge:execute:1"
