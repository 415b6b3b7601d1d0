"""Late and stale results, and the compensations of late successes: the engine's rules for what arrives
after the saga stopped waiting for it (DESIGN section 4).

A result whose attempt is not the one awaited, or that arrives after the saga moved on, changes nothing,
except a late **success** of an abandoned attempt whose step has a compensation: that compensation is
dispatched (a "late compensation", :class:`LateCompensation`), retried like any compensation, and the
saga ends ``failed`` if it fails for good, since a side effect is then left behind.

Part of the pure engine, and like it without I/O. These functions work on the engine's decision in
progress through :class:`Decision`, the part of it they need, so this module does not import the engine.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Protocol, TypeVar

from .constants import Topics
from .context import LateCompensation, SagaContext, StepRuntime, StepStatus, WorkflowState
from .models import AuditActionName, ResultBody, StepKind, command_id
from .values import Timer
from .workflow import WorkflowDefinition, WorkflowStep

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Decision(Protocol[T_co]):
    """The engine's decision in progress (``engine._Run``), as these rules use it; ``T_co`` is what it
    returns for an event (the engine's ``Transition``)."""

    @property
    def saga(self) -> SagaContext: ...
    @property
    def definition(self) -> WorkflowDefinition: ...
    @property
    def topics(self) -> Topics: ...

    def done(self) -> T_co: ...
    def unchanged(self, note: str, rejected: str | None = None) -> T_co: ...
    def record(
        self,
        action: AuditActionName,
        *,
        step: str | None = None,
        kind: StepKind | None = None,
        attempt: int | None = None,
        error: str | None = None,
        worker: str | None = None,
    ) -> None: ...
    def set_state(self, state: WorkflowState, action: AuditActionName, error: str | None = None) -> None: ...
    def send_timed(
        self, cid: str, step: WorkflowStep, phase: StepKind, attempt: int, worker: str, topic: str
    ) -> str | None: ...
    def retry_timer(self, cid: str, step: WorkflowStep, phase: StepKind, attempt: int) -> str: ...
    def drop_timer(self, record: StepRuntime | LateCompensation) -> None: ...
    def step_succeeded(
        self, step: WorkflowStep, rt: StepRuntime, result: dict[str, object], cid: str, attempt: int
    ) -> None: ...
    def compensation_succeeded(self, step: WorkflowStep, rt: StepRuntime, attempt: int) -> None: ...
    def settle(self) -> None: ...


# A step whose execute command is in flight or waiting to be retried.
AWAITING_EXECUTE = (StepStatus.RUNNING, StepStatus.RETRY_WAIT)


def unawaited_result(run: Decision[T], step: WorkflowStep, rt: StepRuntime, body: ResultBody) -> T:
    """The transition of a result for ``step`` that is not the one awaited: a duplicate, a stale
    answer, an earlier attempt's success taken after all, or a late success to compensate."""
    saga = run.saga
    if body.status != "succeeded":
        return run.unchanged("stale result")
    sent = rt.attempt if body.kind == "execute" else rt.compensation_attempt
    sent_id = command_id(saga.transaction_id, step.name, body.kind, body.attempt, saga.run_id)
    if body.command_id != sent_id or not (1 <= body.attempt <= sent):
        # Not a command this saga sent (or the answer to an extra compensation): nothing to take.
        return run.unchanged("unknown command")
    if body.kind == "compensate":
        if rt.status in (StepStatus.COMPENSATING, StepStatus.COMPENSATION_RETRY_WAIT):
            # An earlier compensation attempt succeeded after all while the step still waits for one.
            run.drop_timer(rt)
            run.compensation_succeeded(step, rt, body.attempt)
            return run.done()
        return run.unchanged("stale result")
    if rt.status in AWAITING_EXECUTE and saga.state is WorkflowState.RUNNING:
        # An earlier attempt succeeded after all while the step still waits: take its success.
        run.drop_timer(rt)
        run.step_succeeded(step, rt, body.result or {}, body.command_id, body.attempt)
        return run.done()
    if rt.status is StepStatus.SUCCEEDED or rt.succeeded_command == body.command_id:
        return run.unchanged("duplicate result")
    if step.compensation is None or body.command_id in saga.late_compensations:
        return run.unchanged("stale result")
    if rt.status is StepStatus.FAILED and (
        saga.state is WorkflowState.COMPENSATING
        or (saga.state is WorkflowState.FAILED and step.name in saga.compensation_queue)
    ):
        # Its own compensation is still to come in the rollback (in a failed saga, once an operator's
        # repair lets the rollback go on); that undoes this success too.
        return run.unchanged("compensation pending")
    # A success of an attempt the saga gave up on: undo it so no side effect is left behind.
    saga.late_compensations.append(body.command_id)
    base = command_id(saga.transaction_id, step.name, "compensate", f"late-{body.attempt}", saga.run_id)
    saga.late_runs[base] = LateCompensation(step.name)
    dispatch(run, step, base, 1, AuditActionName.LATE_SUCCESS_COMPENSATED, body.attempt)
    return run.done()


def dispatch(
    run: Decision[Any],
    step: WorkflowStep,
    base: str,
    attempt: int,
    action: AuditActionName,
    shown: int | None = None,
) -> None:
    """Send ``attempt`` of the late compensation ``base``, as command ``<base>.<attempt>``, and record it
    as ``action`` of attempt ``shown`` (``attempt`` unless given)."""
    assert step.compensation is not None
    compensation = run.saga.late_runs[base]
    cid = f"{base}.{attempt}"
    compensation.attempt, compensation.command_id = attempt, cid
    topic = run.topics.compensations(step.compensation)
    compensation.timer_id = run.send_timed(cid, step, "compensate", attempt, step.compensation, topic)
    run.record(
        action,
        step=step.name,
        kind="compensate",
        attempt=attempt if shown is None else shown,
        worker=step.compensation,
    )


def on_result(run: Decision[T], body: ResultBody) -> T | None:
    """The transition of a result of a late compensation's command; None when ``body`` answers none."""
    found = _run_of(run.saga, body.command_id)
    if found is None:
        return None
    base, compensation, attempt = found
    step = run.definition.step(compensation.step)
    if step is None:
        return run.unchanged(f"workflow {run.definition.get_id()!r} has no step {compensation.step!r}")
    if body.status == "succeeded":
        # Any attempt's success undoes the late success, even one the saga stopped waiting for or
        # gave up on (a saga it already failed stays failed: its audit says why).
        del run.saga.late_runs[base]
        run.drop_timer(compensation)
        run.record(
            AuditActionName.LATE_COMPENSATION_SUCCEEDED, step=step.name, kind="compensate", attempt=attempt
        )
        if run.saga.state is WorkflowState.COMPENSATING:
            run.settle()  # a saga an operator's retry sent it for ends once nothing else is under way
        return run.done()
    if compensation.failed or attempt != compensation.attempt or compensation.command_id is None:
        return run.unchanged("stale result")
    run.drop_timer(compensation)
    message, retryable = body.failure()
    _attempt_failed(run, step, base, compensation, message, retryable=retryable)
    return run.done()


def _run_of(saga: SagaContext, cid: str) -> tuple[str, LateCompensation, int] | None:
    """The late compensation that sent command ``cid`` (unsettled, or failed for good), and that
    command's attempt. Ids are matched exactly, never parsed: a result can carry any text."""
    for base, compensation in saga.late_runs.items():
        if cid.startswith(base):
            for attempt in range(1, compensation.attempt + 1):
                if cid == f"{base}.{attempt}":
                    return base, compensation, attempt
    return None


def on_timer(run: Decision[T], timer: Timer) -> T | None:
    """The transition of a late compensation's retry or timeout timer; None when ``timer`` is none."""
    for base, compensation in run.saga.late_runs.items():
        if compensation.timer_id == timer.timer_id:
            return _timer_fired(run, base, compensation, timer)
    return None


def _timer_fired(run: Decision[T], base: str, compensation: LateCompensation, timer: Timer) -> T:
    step = run.definition.step(compensation.step)
    if step is None or step.compensation is None:
        return run.unchanged("stale timer")
    compensation.timer_id = None
    if timer.kind == "retry":
        dispatch(run, step, base, timer.attempt, AuditActionName.LATE_COMPENSATION_DISPATCHED)
    else:
        timeout = step.timeout_of("compensate")
        assert timeout is not None
        # Actions of their own: the audit tells them from the step's own compensation's.
        run.record(
            AuditActionName.LATE_COMPENSATION_TIMED_OUT,
            step=step.name,
            kind="compensate",
            attempt=timer.attempt,
        )
        _attempt_failed(run, step, base, compensation, f"timed out after {timeout:g}s", retryable=True)
    return run.done()


def _attempt_failed(
    run: Decision[Any],
    step: WorkflowStep,
    base: str,
    compensation: LateCompensation,
    error: str,
    *,
    retryable: bool,
) -> None:
    """Retry a late compensation like any compensation; once its retries are spent, the saga ends
    failed (at once if it had ended, else when its rollback ends): a side effect is left behind."""
    saga = run.saga
    compensation.error, compensation.command_id = error, None
    attempt = compensation.attempt
    record = partial(run.record, step=step.name, kind="compensate", error=error)
    record(AuditActionName.LATE_COMPENSATION_FAILED_ATTEMPT, attempt=attempt)
    if retryable and attempt <= run.definition.retry_for(step, "compensate").max_retries:
        compensation.timer_id = run.retry_timer(f"{base}.{attempt + 1}", step, "compensate", attempt + 1)
        record(AuditActionName.LATE_COMPENSATION_RETRY_SCHEDULED, attempt=attempt + 1)
        return
    compensation.failed = True
    record(AuditActionName.LATE_COMPENSATION_FAILED, attempt=attempt)
    if saga.state is WorkflowState.FAILED:
        saga.error = with_failures(saga.error, [compensation])
    elif saga.state.is_final:
        fail_saga(run)
    else:
        # Still rolling back: the rollback ends failed (finish_rollback), unless a late success of this
        # compensation comes first; one an operator's retry sent, with the rollback over, ends now.
        run.settle()


def failures(saga: SagaContext) -> list[LateCompensation]:
    """The saga's late compensations that failed for good."""
    return [compensation for compensation in saga.late_runs.values() if compensation.failed]


def with_failures(error: str | None, compensations: list[LateCompensation]) -> str:
    """``error`` with the reason of each late compensation in ``compensations`` (failed for good)."""
    reasons = [
        f"the compensation of a late success of step {c.step!r} failed: {c.error}" for c in compensations
    ]
    return "; ".join([error, *reasons] if error else reasons)


def fail_saga(run: Decision[Any]) -> None:
    """End the saga failed for its late compensations that failed for good."""
    saga = run.saga
    saga.error = with_failures(saga.error, failures(saga))
    run.set_state(WorkflowState.FAILED, AuditActionName.SAGA_FAILED, error=saga.error)
