"""The engine's rules for an operator's repairs (``saga.repair``): retry, skip a compensation and force a
cancel, each decided on the saga as it is, audited, refused where it does not apply, applied once."""

from __future__ import annotations

import itertools
from typing import Any

from orchestrator_kafka.context import StepStatus, WorkflowState
from orchestrator_kafka.engine import Transition
from orchestrator_kafka.models import RepairAction, RepairBody, RepairSaga
from orchestrator_kafka.repair import REPAIRS_KEPT, refusal
from orchestrator_kafka.workflow import WorkflowBuilder

from .engine_sim import RUN, T0, TX, Driver, actions, result_event, sent
from .test_engine import cmd, comp, ex, parallel_workflow, spec_workflow, timeout_workflow

_ids = itertools.count(1)


def repair_event(d: Driver, action: RepairAction, event_id: str | None = None, **body: Any) -> RepairSaga:
    return RepairSaga(
        event_id=event_id or f"repair-{next(_ids)}",
        transaction_id=TX,
        workflow_id=d.definition.get_id(),
        occurred_at=T0,
        body=RepairBody(action=action, **body),
    )


def repair(d: Driver, action: RepairAction, event_id: str | None = None, **body: Any) -> Transition:
    return d.feed(repair_event(d, action, event_id, **body))


def failed_saga(**retry: Any) -> Driver:
    """The spec's saga failed: charge failed, and its compensation (refund) failed for good, so the
    rollback stopped before releasing the inventory."""
    d = Driver(spec_workflow(max_retries=0, **retry))
    d.start()
    d.succeed("reserve")
    d.fail("charge", retryable=False)
    d.fail("charge", kind="compensate")
    assert d.state == "failed"
    return d


def compensating_a_late_success() -> Driver:
    """A saga whose step a timed out for good and was compensated (the saga compensated), and whose
    timed-out attempt then succeeded after all: the compensation of that late success is under way."""
    d = Driver(timeout_workflow(max_retries=0))
    d.start()
    a1 = d.command("a")
    d.fire(d.timer("a"))  # a times out for good: the saga rolls back
    d.succeed("a", kind="compensate")
    d.feed(result_event(a1, result={}))  # a's late success: an extra compensation
    return d


# ====================================================================== retry


def test_retry_of_a_failed_saga_runs_its_failed_compensation_again_and_goes_on() -> None:
    d = failed_saga()
    t = repair(d, "retry", reason="the payment gateway is back")
    assert sent(t) == [(comp("refund_payment"), cmd("charge", "compensate", 2))]
    assert actions(t) == ["retry_requested", "compensation_dispatched"]
    assert t.audit is not None and t.audit.body.from_state == "failed"
    saga = t.saga
    assert saga is not None and saga.state is WorkflowState.COMPENSATING and saga.current_step == "charge"
    t = d.succeed("charge", kind="compensate", attempt=2)
    assert sent(t) == [(comp("release_inventory"), cmd("reserve", "compensate"))]
    t = d.succeed("reserve", kind="compensate")
    assert d.state == "compensated"
    assert d.saga is not None and d.saga.error is not None and d.saga.error.startswith("retried after:")


def test_a_retried_compensation_that_fails_again_fails_the_saga_again() -> None:
    d = failed_saga()
    repair(d, "retry")
    t = d.fail("charge", kind="compensate", attempt=2)
    assert d.state == "failed" and t.timers == ()
    # and it can be retried once more; its error says so once
    assert sent(repair(d, "retry")) == [(comp("refund_payment"), cmd("charge", "compensate", 3))]
    assert d.saga is not None and d.saga.error is not None and d.saga.error.count("retried after") == 1


def test_retry_resends_a_stuck_step_s_awaited_command_unchanged() -> None:
    d = Driver(spec_workflow())
    d.start(order_id="O-1")
    first = d.command("reserve")
    t = repair(d, "retry")
    assert sent(t) == [(ex("reserve_inventory"), cmd("reserve"))]
    again = t.commands[0][1]
    assert again.event_id == first.event_id and again.body == first.body
    assert actions(t) == ["retry_requested", "command_resent"]
    assert d.state == "running" and t.timers == () and t.cancel_timers == ()
    # the worker's answer to it is taken as the awaited one
    assert d.succeed("reserve").changed
    assert d.saga is not None and d.saga.step("reserve").status is StepStatus.SUCCEEDED


def test_retry_sends_an_attempt_waiting_to_be_retried_now() -> None:
    d = Driver(spec_workflow(max_retries=3, initial_delay=60.0))
    d.start()
    retry_timer = d.fail("reserve").timers[0]
    t = repair(d, "retry", step="reserve")
    assert sent(t) == [(ex("reserve_inventory"), cmd("reserve", "execute", 2))]
    assert retry_timer.timer_id in t.cancel_timers
    assert d.saga is not None and d.saga.step("reserve").status is StepStatus.RUNNING


def test_retry_resends_a_stuck_compensation() -> None:
    d = Driver(spec_workflow(max_retries=0))
    d.start()
    d.succeed("reserve")
    d.fail("charge", retryable=False)
    t = repair(d, "retry")
    assert sent(t) == [(comp("refund_payment"), cmd("charge", "compensate", 1))]
    assert d.state == "compensating"


def test_retry_of_a_failed_late_compensation_ends_the_saga_once_it_is_undone() -> None:
    d = compensating_a_late_success()
    d.fail("a", kind="compensate", attempt="late-1.1")
    assert d.state == "failed"
    t = repair(d, "retry")
    assert sent(t) == [(comp("ua"), cmd("a", "compensate", "late-1.2"))]
    assert d.state == "compensating"
    t = d.succeed("a", kind="compensate", attempt="late-1.2")
    assert actions(t) == ["late_compensation_succeeded", "saga_compensated"]
    assert d.saga is not None and d.saga.late_runs == {}


def test_retry_is_refused_when_there_is_nothing_to_retry() -> None:
    d = Driver(spec_workflow())
    d.start()
    for step in ("reserve", "charge", "ship"):
        d.succeed(step)
    t = repair(d, "retry")
    assert not t.changed and t.rejected is not None
    assert "no failed compensation" in t.rejected


# ====================================================================== skip


def test_skip_of_a_failed_compensation_goes_on_with_the_rollback() -> None:
    d = failed_saga()
    t = repair(d, "skip_compensation", step="charge", reason="refunded by hand")
    assert sent(t) == [(comp("release_inventory"), cmd("reserve", "compensate"))]
    assert actions(t) == ["compensation_skipped", "compensation_dispatched"]
    assert t.audit is not None and t.audit.body.actions[0].error == "refunded by hand"
    assert d.saga is not None and d.saga.step("charge").status is StepStatus.COMPENSATED
    d.succeed("reserve", kind="compensate")
    assert d.state == "compensated"


def test_skip_of_a_stuck_compensation_drops_its_timer_and_ignores_its_late_answer() -> None:
    d = Driver(
        WorkflowBuilder("wf")
        .add_step("a", "wa", compensation="ua")
        .add_step("b", "wb", compensation="ub", compensation_timeout=30)
        .build()
    )
    d.start()
    d.succeed("a")
    d.fail("b", retryable=False)
    stuck = d.command("b", "compensate")
    t = repair(d, "skip_compensation", step="b", reason="the worker is gone; undone by hand")
    assert len(t.cancel_timers) == 1 and d.timers.keys().isdisjoint(t.cancel_timers)
    assert sent(t) == [(comp("ua"), cmd("a", "compensate"))]
    assert not d.feed(result_event(stuck, ok=False)).changed
    d.succeed("a", kind="compensate")
    assert d.state == "compensated"


def test_skip_is_refused_for_a_step_with_no_compensation_failed_or_under_way() -> None:
    d = failed_saga()
    t = repair(d, "skip_compensation", step="reserve", reason="x")
    assert not t.changed and t.rejected is not None and "'reserve'" in t.rejected
    t = repair(d, "skip_compensation", step="nope", reason="x")
    assert t.rejected == "workflow 'transaction' has no step 'nope'"


# ====================================================================== force-cancel


def stuck_compensating() -> Driver:
    """A saga whose parallel branch q failed while p and r still run, with no timeout: it waits for
    them, compensating, for ever when their worker is gone."""
    d = Driver(parallel_workflow())
    d.start()
    d.succeed("a")
    d.fail("q", retryable=False)
    assert d.state == "compensating"
    assert d.cancel().rejected is not None
    return d


def test_force_cancel_stops_waiting_compensates_the_steps_in_flight_and_ends_cancelled() -> None:
    d = stuck_compensating()
    t = repair(d, "force_cancel", reason="wp and wr are gone")
    assert actions(t)[0] == "force_cancel_requested"
    workers = [topic for topic, _ in sent(t)]
    assert len(workers) == 1 and workers[0] in {comp("up"), comp("ur"), comp("uq")}
    order = []
    while d.state == "compensating":
        pending = [c for _, c in d.commands if c.body.kind == "compensate"][-1]
        order.append(pending.body.worker_name)
        d.feed(result_event(pending, result={}))
    assert sorted(order[:3]) == ["up", "uq", "ur"] and order[3:] == ["ua"]
    assert d.state == "cancelled"
    assert d.saga is not None and d.saga.error == "wp and wr are gone"


def test_force_cancel_of_a_running_saga_is_a_cancel() -> None:
    d = Driver(spec_workflow())
    d.start()
    t = repair(d, "force_cancel")
    assert actions(t)[0] == "force_cancel_requested" and d.state == "compensating"


def test_force_cancel_is_refused_for_an_ended_saga() -> None:
    d = failed_saga()
    t = repair(d, "force_cancel")
    assert t.rejected == "a failed saga cannot be force-cancelled: retry it, or skip its failed compensation"


# ====================================================================== every repair


def test_a_repair_is_applied_once_by_its_event_id() -> None:
    d = failed_saga()
    assert repair(d, "retry", event_id="once").changed
    d.fail("charge", kind="compensate", attempt=2)
    t = repair(d, "retry", event_id="once")
    assert not t.changed and t.note == "duplicate repair"


def test_the_saga_remembers_a_bounded_number_of_repairs() -> None:
    d = Driver(spec_workflow())
    d.start()
    for i in range(REPAIRS_KEPT + 5):
        assert repair(d, "retry", event_id=f"r{i}").changed
    assert d.saga is not None and d.saga.repairs == [f"r{i}" for i in range(5, REPAIRS_KEPT + 5)]


def test_a_repair_of_another_run_is_refused() -> None:
    d = failed_saga()
    t = repair(d, "retry", run_id="0123456789abcdef")
    assert t.rejected is not None and "started again" in t.rejected
    assert repair(d, "retry", run_id=RUN).changed


def test_a_client_side_check_needs_no_definition() -> None:
    d = failed_saga()
    assert d.saga is not None
    body = RepairBody(action="skip_compensation", step="charge")
    assert refusal(d.saga, body) == "skip_compensation needs the step and a reason"
    assert refusal(d.saga, RepairBody(action="retry")) is None
    before = dict(d.saga.steps)
    refusal(d.saga, RepairBody(action="skip_compensation", step="ship", reason="r"))
    assert d.saga.steps == before  # checking never adds a step record to the stored saga


def test_skip_of_a_failed_late_compensation_ends_the_failed_saga_as_its_rollback_did() -> None:
    d = compensating_a_late_success()
    d.fail("a", kind="compensate", attempt="late-1.1")
    assert d.state == "failed"
    t = repair(d, "skip_compensation", step="a", reason="undone by hand")
    assert actions(t) == ["compensation_skipped", "saga_compensated"]
    assert d.saga is not None and d.saga.late_runs == {}


# ====================================================================== regressions (repair property tests)


def two_branches() -> Driver:
    """A failed saga of two parallel branches: q timed out and p failed, so both are compensated, q
    first; q's compensation succeeded, p's failed for good; then q's timed-out attempt succeeded after
    all, and the compensation of that late success failed for good too."""
    d = Driver(
        WorkflowBuilder("wf")
        .add_parallel_steps(
            [
                {"name": "p", "worker_name": "wp", "compensation": "up"},
                {"name": "q", "worker_name": "wq", "compensation": "uq", "timeout": 5},
            ]
        )
        .with_retry_config(max_retries=0)
        .build()
    )
    d.start()
    q1 = d.command("q")
    d.fire(d.timer("q"))
    d.fail("p", retryable=False)
    d.succeed("q", kind="compensate")
    d.fail("p", kind="compensate")
    assert d.state == "failed"
    d.feed(result_event(q1, result={}))
    d.fail("q", kind="compensate", attempt="late-1.1")
    assert d.state == "failed"
    assert d.saga is not None and d.saga.step("p").status is StepStatus.COMPENSATION_FAILED
    return d


def test_skip_of_a_late_compensation_leaves_the_saga_failed_while_a_step_s_stays_failed() -> None:
    # It made the saga compensating with nothing under way: stuck, and neither retry nor force_cancel
    # took it out.
    d = two_branches()
    t = repair(d, "skip_compensation", step="q", reason="undone by hand")
    assert actions(t) == ["compensation_skipped"] and d.state == "failed"
    assert d.saga is not None and d.saga.late_runs == {}
    assert sent(repair(d, "retry")) == [(comp("up"), cmd("p", "compensate", 2))]
    d.succeed("p", kind="compensate", attempt=2)
    assert d.state == "compensated"


def test_retry_of_one_step_leaves_the_saga_failed_while_another_step_s_compensation_stays_failed() -> None:
    d = two_branches()
    t = repair(d, "retry", step="q")
    assert sent(t) == [(comp("uq"), cmd("q", "compensate", "late-1.2"))] and d.state == "failed"
    d.succeed("q", kind="compensate", attempt="late-1.2")
    assert d.state == "failed"  # p's compensation is still failed: not compensating with nothing under way
    assert d.saga is not None and d.saga.late_runs == {}
    repair(d, "retry")
    d.succeed("p", kind="compensate", attempt=2)
    assert d.state == "compensated"


def test_retry_ends_a_failed_saga_whose_failure_was_undone_after_all() -> None:
    # The late compensation that failed the saga succeeded after all: a retry was refused (nothing
    # failed) and the saga stayed failed for ever.
    d = compensating_a_late_success()
    late = d.command("a", "compensate", "late-1.1")
    d.fire(d.timer("a"))  # the late compensation times out, for good
    assert d.state == "failed"
    d.feed(result_event(late, result={}))  # and succeeds after all
    assert d.state == "failed" and d.saga is not None and d.saga.late_runs == {}
    t = repair(d, "retry")
    assert actions(t) == ["retry_requested", "saga_compensated"] and t.commands == ()


def test_a_late_success_in_a_failed_saga_is_left_to_the_step_s_own_compensation() -> None:
    # It was compensated as a late success, and again by the step's own compensation once a retry let
    # the rollback go on.
    d = Driver(
        WorkflowBuilder("wf")
        .add_parallel_steps(
            [
                {"name": "p", "worker_name": "wp", "compensation": "up", "timeout": 5},
                {"name": "q", "worker_name": "wq", "compensation": "uq"},
            ]
        )
        .with_retry_config(max_retries=0)
        .build()
    )
    d.start()
    p1 = d.command("p")
    d.fire(d.timer("p"))
    d.fail("q", retryable=False)
    d.fail("q", kind="compensate")  # q's compensation fails for good before p's was sent
    assert d.state == "failed"
    t = d.feed(result_event(p1, result={}))
    assert not t.changed and t.note == "compensation pending"
    repair(d, "retry")
    d.succeed("q", kind="compensate", attempt=2)
    d.succeed("p", kind="compensate")
    assert d.state == "compensated"
    assert [c for _, c in d.commands if ":late-" in c.body.command_id] == []
