"""An operator's repairs of a saga (``saga.repair``): the engine's rules for them (DESIGN section 10).

- ``retry``: a ``failed`` saga's failed compensations (its own, and those of late successes) are sent
  again, one more attempt each, and its rollback goes on; the saga is ``compensating`` until it ends. A
  retry of one step while another step's own compensation stays failed sends that step's compensations
  and leaves the saga ``failed``: its rollback cannot go on past the failed one. A failed saga whose
  failures were all undone after all (a failed compensation's late success) has nothing to send: the
  retry ends it as its rollback would have. On a saga that is not failed, each command it awaits is sent
  again as it was (same command id, so a worker that ran it answers from its dedupe window), and each
  attempt waiting to be retried is sent now.
- ``skip_compensation``: one step's failed or stuck compensation (and any compensation of its late
  successes) counts as done by hand; the rollback goes on, and a failed saga with nothing else failed
  ends as its rollback would have. A failed saga whose rollback stopped at another step stays failed.
- ``force_cancel``: a saga stuck ``compensating`` (waiting for a parallel step whose worker is gone)
  stops waiting: the steps in flight are taken as failed and compensated first, as a cancel does, and
  the saga ends ``cancelled``. On a running saga it is a cancel.

:func:`refusal` says why a repair does not apply, for the engine and for a client that checks before it
sends; :func:`repair` applies one. Each applied repair is audited and remembered in the saga
(``SagaContext.repairs``), so a redelivered request is applied once. Part of the pure engine.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

from . import late
from .context import LateCompensation, SagaContext, StepStatus, WorkflowState
from .late import AWAITING_EXECUTE, Decision
from .models import AuditActionName, RepairBody, StepKind
from .workflow import WorkflowDefinition, WorkflowStep

__all__ = ["REPAIRS_KEPT", "Repairing", "refusal", "repair", "settle"]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

REPAIRS_KEPT = 16
_RETRIED = "retried after: "

# A step whose compensation is under way, or failed for good.
_COMPENSATION_STARTED = (
    StepStatus.COMPENSATING,
    StepStatus.COMPENSATION_RETRY_WAIT,
    StepStatus.COMPENSATED,
    StepStatus.COMPENSATION_FAILED,
)
_SKIPPABLE = (StepStatus.COMPENSATION_FAILED, StepStatus.COMPENSATING, StepStatus.COMPENSATION_RETRY_WAIT)
# A step with a command in flight, or an attempt waiting to be sent.
_BUSY = (*AWAITING_EXECUTE, StepStatus.COMPENSATING, StepStatus.COMPENSATION_RETRY_WAIT)


class Repairing(Decision[T_co], Protocol[T_co]):
    """The engine's decision in progress as the repairs use it: :class:`~.late.Decision`, and the
    rollback's moves."""

    def dispatch(self, step: WorkflowStep, phase: StepKind, attempt: int) -> None: ...
    def resend(self, cid: str, step: WorkflowStep, phase: StepKind, attempt: int) -> None: ...
    def cancel(self, reason: str | None, action: AuditActionName = ...) -> T_co: ...
    def stop_waiting(self) -> None: ...
    def start_compensations(self) -> None: ...
    def next_compensation(self) -> None: ...
    def finish_rollback(self) -> None: ...


def refusal(saga: SagaContext, body: RepairBody, definition: WorkflowDefinition | None = None) -> str | None:
    """Why the repair ``body`` does not apply to ``saga`` as it stands, or None when it does. Without
    the saga's ``definition`` (a client's check before it sends), what only it can tell goes unchecked."""
    if body.run_id and body.run_id != saga.run_id:
        return f"run {body.run_id!r} is not the saga's run ({saga.run_id!r}): it was started again"
    if body.step is not None and definition is not None and definition.step(body.step) is None:
        return f"workflow {definition.get_id()!r} has no step {body.step!r}"
    if body.action == "force_cancel":
        if saga.state.is_final:
            hint = ": retry it, or skip its failed compensation" if saga.state is WorkflowState.FAILED else ""
            return f"a {saga.state.value} saga cannot be force-cancelled{hint}"
        return None
    if body.action == "skip_compensation":
        if body.step is None or not body.reason:
            return "skip_compensation needs the step and a reason"
        status = _status(saga, body.step)
        if status not in _SKIPPABLE and not _late_of(saga, body.step):
            return f"step {body.step!r} has no compensation failed or under way (it is {status.value})"
        return None
    if saga.state is WorkflowState.FAILED and not _failed(saga):
        return None  # its failures were undone after all: the retry ends it as its rollback would have
    if not _retry_targets(saga, body.step, definition):
        what = f"step {body.step!r}" if body.step else f"the {saga.state.value} saga"
        return f"{what} has no failed compensation, and no command awaited or attempt waiting to be retried"
    return None


def repair(run: Repairing[T], body: RepairBody, event_id: str) -> T:
    """The transition the repair ``body`` (request ``event_id``) makes; unchanged, with the reason as
    ``rejected``, where it does not apply."""
    saga = run.saga
    if event_id in saga.repairs:
        return run.unchanged("duplicate repair")
    refused = refusal(saga, body, run.definition)
    if refused is not None:
        return run.unchanged(f"{body.action} refused", rejected=refused)
    saga.repairs = [*saga.repairs[-(REPAIRS_KEPT - 1) :], event_id]
    if body.action == "force_cancel":
        return _force_cancel(run, body.reason or "force-cancelled by an operator")
    if body.action == "skip_compensation":
        assert body.step is not None and body.reason
        _skip(run, body.step, body.reason)
    else:
        _retry(run, body.step, body.reason)
    settle(run)
    return run.done()


def settle(run: Repairing[Any]) -> None:
    """End a repaired saga once nothing of it is under way: ``failed`` while a compensation stays
    failed, else as its rollback would have ended. A saga whose rollback is still going, or
    that is failed with a failure left, is left as it is."""
    saga = run.saga
    if saga.state not in (WorkflowState.COMPENSATING, WorkflowState.FAILED):
        return
    if saga.compensation_queue or any(rt.status in _BUSY for rt in saga.steps.values()):
        return
    if saga.state is WorkflowState.FAILED and late.failures(saga):
        return
    if saga.state is WorkflowState.COMPENSATING and any(not c.failed for c in saga.late_runs.values()):
        return  # the compensations of late successes the repair sent are still under way
    # Only a rollback leaves a saga failed (a completed saga's late successes are duplicates of the
    # success it took), so it ends as its rollback does.
    run.finish_rollback()


def _status(saga: SagaContext, step: str) -> StepStatus:
    rt = saga.steps.get(step)  # read, never made: the saga may be the stored one
    return StepStatus.PENDING if rt is None else rt.status


def _failed(saga: SagaContext) -> bool:
    """Whether a compensation of ``saga`` (a step's own, or a late success's) failed for good."""
    return bool(late.failures(saga)) or any(
        rt.status is StepStatus.COMPENSATION_FAILED for rt in saga.steps.values()
    )


def _goes_on(saga: SagaContext, repaired: str | None) -> bool:
    """Whether a repair of step ``repaired`` (None: of every step) lets a failed saga's rollback go on:
    no other step's own compensation stays failed. Where one does, the saga stays failed (the rollback
    stops at it) while the repair's compensations of late successes run."""
    return repaired is None or not any(
        rt.status is StepStatus.COMPENSATION_FAILED and name != repaired for name, rt in saga.steps.items()
    )


def _late_of(saga: SagaContext, step: str) -> list[tuple[str, LateCompensation]]:
    return [(base, c) for base, c in saga.late_runs.items() if c.step == step]


# ---------------------------------------------------------------- retry


def _retry_targets(
    saga: SagaContext, only: str | None, definition: WorkflowDefinition | None
) -> list[tuple[str, str | None]]:
    """What a retry sends: each (step, None) for the step's own command, (step, base) for the
    compensation of a late success ``base``; with ``definition``, only steps it has."""
    failed = saga.state is WorkflowState.FAILED
    targets: list[tuple[str, str | None]] = []
    for name, rt in saga.steps.items():
        if rt.status is StepStatus.COMPENSATION_FAILED if failed else rt.status in _BUSY:
            targets.append((name, None))
    for base, compensation in saga.late_runs.items():
        if compensation.failed if failed else (compensation.command_id or compensation.timer_id):
            targets.append((compensation.step, base))
    return [
        (name, base)
        for name, base in targets
        if (only is None or name == only) and (definition is None or definition.step(name) is not None)
    ]


def _retry(run: Repairing[Any], only: str | None, reason: str | None) -> None:
    saga, definition = run.saga, run.definition
    targets = _retry_targets(saga, only, definition)
    if saga.state is WorkflowState.FAILED and _goes_on(saga, only):
        if not (saga.error or "").startswith(_RETRIED):  # once, however many retries
            saga.error = f"{_RETRIED}{saga.error}"
        run.set_state(WorkflowState.COMPENSATING, AuditActionName.RETRY_REQUESTED, error=reason)
    else:
        run.record(AuditActionName.RETRY_REQUESTED, step=only, error=reason)
    for name, base in targets:
        step = definition.step(name)
        assert step is not None  # the targets are the definition's steps
        if base is not None:
            _retry_late(run, step, base, saga.late_runs[base])
            continue
        rt = saga.step(step.name)
        phase: StepKind = "execute" if rt.status in AWAITING_EXECUTE else "compensate"
        attempt = rt.attempt if phase == "execute" else rt.compensation_attempt
        if rt.status in (StepStatus.RUNNING, StepStatus.COMPENSATING) and rt.command_id is not None:
            run.resend(rt.command_id, step, phase, attempt)
        else:  # failed for good, or waiting to be retried: the next attempt, now
            run.drop_timer(rt)
            run.dispatch(step, phase, attempt + 1)
            if phase == "compensate":
                saga.current_step = step.name


def _retry_late(run: Repairing[Any], step: WorkflowStep, base: str, compensation: LateCompensation) -> None:
    if compensation.command_id is not None:
        run.resend(compensation.command_id, step, "compensate", compensation.attempt)
        return
    run.drop_timer(compensation)
    compensation.failed, compensation.error = False, None
    late.dispatch(run, step, base, compensation.attempt + 1, AuditActionName.LATE_COMPENSATION_DISPATCHED)


# ---------------------------------------------------------------- skip and force-cancel


def _skip(run: Repairing[Any], name: str, reason: str) -> None:
    saga = run.saga
    rt = saga.step(name)
    if saga.state is WorkflowState.FAILED and _goes_on(saga, name):
        saga.state = WorkflowState.COMPENSATING
    for base, compensation in _late_of(saga, name):
        run.drop_timer(compensation)
        del saga.late_runs[base]
    run.record(AuditActionName.COMPENSATION_SKIPPED, step=name, kind="compensate", error=reason)
    if rt.status in _SKIPPABLE:
        run.drop_timer(rt)
        rt.status, rt.command_id = StepStatus.COMPENSATED, None
        if saga.compensation_queue and saga.compensation_queue[0] == name:
            run.next_compensation()


def _force_cancel(run: Repairing[T], reason: str) -> T:
    saga = run.saga
    if saga.state is not WorkflowState.COMPENSATING:
        return run.cancel(reason, AuditActionName.FORCE_CANCEL_REQUESTED)
    saga.cancel_requested = True
    saga.error = reason
    run.record(AuditActionName.FORCE_CANCEL_REQUESTED, error=reason)
    run.stop_waiting()  # as a cancel does
    started = any(rt.status in _COMPENSATION_STARTED for rt in saga.steps.values())
    if not started:
        run.start_compensations()
    else:
        settle(run)
    return run.done()
