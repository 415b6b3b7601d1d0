"""The saga state machine: ``decide(definition, saga, event, now) -> Transition``.

Pure: no I/O, no asyncio, no clock of its own. Every rule of DESIGN section 4 lives here: sequential,
conditional and parallel steps; retries as durable timers; step timeouts; compensation order;
cancellation; and, in :mod:`.late`, duplicate, stale and late results and the compensations of late
successes. The orchestrator persists what it returns atomically and publishes its commands and audit
events, built by the wire builders of :mod:`.models`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from . import late, repair
from .constants import Topics
from .context import LateCompensation, SagaContext, StepRuntime, StepStatus, WorkflowState
from .late import AWAITING_EXECUTE
from .models import (
    AuditActionName,
    CancelSaga,
    RepairSaga,
    SagaEvent,
    StartSaga,
    StepCommand,
    StepKind,
    StepResult,
    audit_action,
    command_id,
    command_payload,
    run_id_of,
    transition_payload,
)
from .values import Timer
from .workflow import WorkflowDefinition, WorkflowStep

# command_id is the wire format's (models), re-exported: callers and tests know it as the engine's.
__all__ = ["Event", "Outgoing", "Phase", "TimerFired", "Transition", "command_id", "decide", "park"]

Phase = StepKind  # a command's kind: execute the step, or compensate it


@dataclass(frozen=True, slots=True)
class TimerFired:
    """A durable timer came due."""

    timer: Timer

    @property
    def event_id(self) -> str:
        return f"timer:{self.timer.timer_id}"


Event = StartSaga | CancelSaga | RepairSaga | StepResult | TimerFired


@dataclass(slots=True)
class Outgoing:
    """A message a transition sends: its topic and its wire fields, as plain JSON values.

    Kept as a dict so the hot path encodes it with orjson in about a microsecond; :meth:`message`
    builds the pydantic model (the wire contract) for whoever wants to look at it. Neither this nor
    :class:`Transition` is frozen, because a frozen dataclass costs several times more to build and the
    engine builds both for every event; treat them as read-only.
    """

    topic: str
    payload: dict[str, Any]

    def message(self) -> StepCommand | SagaEvent:
        """The payload as its wire model, validated."""
        model = StepCommand if self.payload["event_type"] == "step.command" else SagaEvent
        return model.model_validate(self.payload)

    def encode(self) -> bytes:
        """The message's JSON bytes, as ``codec.encode`` would give for :meth:`message`."""
        return orjson.dumps(self.payload, option=orjson.OPT_UTC_Z)


@dataclass(slots=True)
class Transition:
    """What one event does to one saga.

    ``saga`` is the state after the event (the input object when ``changed`` is false). ``outgoing``
    holds the step commands to send, then the transition's audit record; ``commands`` and ``audit`` show
    them as wire models. ``rejected`` says why a request (a cancel) was refused. ``note`` says why an
    event changed nothing.
    """

    saga: SagaContext | None
    changed: bool
    outgoing: tuple[Outgoing, ...] = ()
    timers: tuple[Timer, ...] = ()
    cancel_timers: tuple[str, ...] = ()
    note: str = ""
    rejected: str | None = None

    @property
    def commands(self) -> tuple[tuple[str, StepCommand], ...]:
        """The step commands to send, with their topics."""
        return tuple(
            (o.topic, StepCommand.model_validate(o.payload))
            for o in self.outgoing
            if o.payload["event_type"] == "step.command"
        )

    @property
    def audit(self) -> SagaEvent | None:
        """The transition's audit record, or None when nothing changed."""
        for o in self.outgoing:
            if o.payload["event_type"] == "saga.transition":
                return SagaEvent.model_validate(o.payload)
        return None


_TOPICS = Topics()
# Enum members read once (the action names by a command's kind): on Python 3.11 reading one, such as
# StepStatus.FAILED, costs a few times a dict lookup, and these are on the hot path.
_SETTLED = (StepStatus.SUCCEEDED, StepStatus.FAILED)
_DISPATCHED = {
    "execute": AuditActionName.STEP_DISPATCHED,
    "compensate": AuditActionName.COMPENSATION_DISPATCHED,
}
_FAILED_ATTEMPT = {
    "execute": AuditActionName.STEP_FAILED,
    "compensate": AuditActionName.COMPENSATION_FAILED_ATTEMPT,
}


def decide(
    definition: WorkflowDefinition,
    saga: SagaContext | None,
    event: Event,
    now: datetime,
    topics: Topics | None = None,
) -> Transition:
    """The transition ``event`` makes on ``saga`` at ``now``. Never raises for any event or state."""
    if isinstance(event, StartSaga):
        if saga is not None:
            return Transition(saga, False, note="already started")
        return _Run(definition, _new_saga(definition, event, now), now, topics or _TOPICS).start()
    if saga is None:
        return Transition(None, False, note="unknown saga")
    run = _Run(definition, saga.copy(), now, topics or _TOPICS, original=saga)
    if isinstance(event, CancelSaga):
        return run.cancel(event.body.reason)
    if isinstance(event, RepairSaga):
        return repair.repair(run, event.body, event.event_id)
    if isinstance(event, StepResult):
        return run.result(event)
    return run.timer(event.timer)


def park(saga: SagaContext, reason: str, now: datetime, topics: Topics | None = None) -> Transition:
    """Mark ``saga`` parked for ``reason`` (its workflow version is not loaded where its event was
    read), in its status and in the audit; unchanged when it is parked already. Its state, steps and
    timers stay as they are: the orchestrator that carries its version takes it up again."""
    if saga.parked is not None:
        return Transition(saga, False, note="parked already")
    parked = saga.copy()
    parked.parked = reason
    parked.version = version = saga.version + 1
    parked.updated_at = now
    action = audit_action(AuditActionName.SAGA_PARKED, parked.state, None, None, None, None, reason)
    audit = transition_payload(
        parked.transaction_id,
        parked.workflow_id,
        now,
        saga.state,
        parked.state,
        version,
        [action],
        parked.run_id,
    )
    return Transition(parked, True, (Outgoing((topics or _TOPICS).events, audit),))


def _new_saga(definition: WorkflowDefinition, event: StartSaga, now: datetime) -> SagaContext:
    return SagaContext(
        transaction_id=event.transaction_id,
        workflow_id=event.workflow_id,
        state=WorkflowState.PENDING,
        data=dict(event.body.context),
        created_at=now,
        updated_at=now,
        version=0,
        run_id=run_id_of(event.event_id, now),
        workflow_version=definition.version,
    )


class _Run:
    """One decision in progress: a working copy of the saga and what the event produced."""

    __slots__ = (
        "actions",
        "cancel_timers",
        "definition",
        "from_state",
        "from_version",
        "now",
        "original",
        "outgoing",
        "saga",
        "timers",
        "topics",
    )

    def __init__(
        self,
        definition: WorkflowDefinition,
        saga: SagaContext,
        now: datetime,
        topics: Topics,
        original: SagaContext | None = None,
    ) -> None:
        self.definition, self.saga, self.now, self.topics = definition, saga, now, topics
        self.original = original
        self.outgoing: list[Outgoing] = []
        self.timers: list[Timer] = []
        self.cancel_timers: list[str] = []
        self.actions: list[dict[str, Any]] = []
        self.from_version = saga.version
        self.from_state: WorkflowState | None = saga.state
        if saga.parked is not None:
            # An orchestrator that carries the saga's version has it: it runs on from here.
            saga.parked = None
            self.record(AuditActionName.SAGA_RESUMED)

    # ---------------------------------------------------------------- output

    def done(self) -> Transition:
        saga = self.saga
        saga.version = version = self.from_version + 1
        saga.updated_at = now = self.now
        audit = transition_payload(
            saga.transaction_id,
            saga.workflow_id,
            now,
            self.from_state,
            saga.state,
            version,
            self.actions,
            saga.run_id,
        )
        self.outgoing.append(Outgoing(self.topics.events, audit))
        return Transition(saga, True, tuple(self.outgoing), tuple(self.timers), tuple(self.cancel_timers))

    def unchanged(self, note: str, rejected: str | None = None) -> Transition:
        if self.actions:  # the saga resumed: that much changed
            resumed = self.done()
            resumed.note, resumed.rejected = note, rejected
            return resumed
        return Transition(self.original or self.saga, False, note=note, rejected=rejected)

    def record(
        self,
        action: AuditActionName,
        *,
        step: str | None = None,
        kind: Phase | None = None,
        attempt: int | None = None,
        error: str | None = None,
        worker: str | None = None,
    ) -> None:
        """Add ``action`` to the transition's audit record, at the saga's state now."""
        self.actions.append(audit_action(action, self.saga.state, step, worker, kind, attempt, error))

    def set_state(self, state: WorkflowState, action: AuditActionName, error: str | None = None) -> None:
        self.saga.state = state
        if state.is_final:
            self.saga.current_step = None
        self.record(action, error=error)

    # ---------------------------------------------------------------- start and stages

    def start(self) -> Transition:
        self.from_version, self.from_state = 0, None
        self.record(AuditActionName.SAGA_CREATED)
        self.enter_stage(0)
        return self.done()

    def enter_stage(self, index: int) -> None:
        stages = self.definition.stages
        while index < len(stages):
            self.saga.stage = index
            to_run: list[WorkflowStep] = []
            for step in stages[index]:
                if step.condition is not None:
                    try:
                        holds = bool(step.condition(self.saga))
                    except Exception as exc:  # noqa: BLE001 - a user's condition must not crash the engine
                        error = f"condition of step {step.name!r} raised {type(exc).__name__}: {exc}"
                        self.saga.step(step.name).status = StepStatus.FAILED
                        self.saga.step(step.name).error = error
                        self.record(AuditActionName.CONDITION_FAILED, step=step.name, error=error)
                        self.rollback(error)
                        return
                    if not holds:
                        self.saga.step(step.name).status = StepStatus.SKIPPED
                        self.record(AuditActionName.STEP_SKIPPED, step=step.name)
                        continue
                to_run.append(step)
            if to_run:
                if self.saga.state is WorkflowState.PENDING:
                    self.set_state(WorkflowState.RUNNING, AuditActionName.SAGA_STARTED)
                for step in to_run:
                    self.dispatch(step, "execute", 1)
                self.saga.current_step = ",".join([step.name for step in to_run])
                return
            index += 1
        self.set_state(WorkflowState.COMPLETED, AuditActionName.SAGA_COMPLETED)

    def stage_steps(self) -> list[WorkflowStep]:
        saga, skipped = self.saga, StepStatus.SKIPPED
        return [
            step for step in self.definition.stages[saga.stage] if saga.step(step.name).status is not skipped
        ]

    # ---------------------------------------------------------------- commands and timers

    def dispatch(self, step: WorkflowStep, phase: Phase, attempt: int) -> None:
        rt = self.saga.step(step.name)
        cid = command_id(self.saga.transaction_id, step.name, phase, attempt, self.saga.run_id)
        if phase == "execute":
            rt.status, rt.attempt = StepStatus.RUNNING, attempt
            worker = step.worker_name
            topic = self.topics.commands(worker)
        else:
            assert step.compensation is not None
            rt.status, rt.compensation_attempt = StepStatus.COMPENSATING, attempt
            worker = step.compensation
            topic = self.topics.compensations(worker)
        rt.command_id = cid
        rt.dispatched_at = self.now.timestamp()
        rt.timer_id = self.send_timed(cid, step, phase, attempt, worker, topic)
        self.record(_DISPATCHED[phase], step=step.name, kind=phase, attempt=attempt, worker=worker)

    def send_timed(
        self, cid: str, step: WorkflowStep, phase: Phase, attempt: int, worker: str, topic: str
    ) -> str | None:
        """Send command ``cid`` to ``topic``, and set the step's timeout timer for it; the timer's id, if
        the step has a timeout."""
        saga = self.saga
        timeout = self.send(cid, step, phase, attempt, worker, topic)
        if timeout is None:
            return None
        timer = Timer(
            f"{cid}:timeout",
            saga.transaction_id,
            self.now.timestamp() + timeout,
            "timeout",
            step.name,
            phase,
            attempt,
            cid,
        )
        self.timers.append(timer)
        return timer.timer_id

    def send(
        self, cid: str, step: WorkflowStep, phase: Phase, attempt: int, worker: str, topic: str
    ) -> float | None:
        """Send command ``cid`` to ``topic``; the attempt's timeout (seconds), which it carries."""
        saga = self.saga
        payload = command_payload(
            saga.transaction_id,
            saga.workflow_id,
            self.now,
            cid,
            step.name,
            worker,
            phase,
            attempt,
            dict(saga.data),  # a copy: the saga's data changes as later steps succeed
            timeout := step.timeout_of(phase),
        )
        self.outgoing.append(Outgoing(topic, payload))
        return timeout

    def resend(self, cid: str, step: WorkflowStep, phase: Phase, attempt: int) -> None:
        """Send the awaited command ``cid`` again, as it was (an operator's retry of a stuck step): a
        worker that ran it answers from its dedupe window. Its timeout timer, if any, runs on."""
        if phase == "execute":
            worker, topic = step.worker_name, self.topics.commands(step.worker_name)
        else:
            assert step.compensation is not None
            worker, topic = step.compensation, self.topics.compensations(step.compensation)
        self.send(cid, step, phase, attempt, worker, topic)
        self.record(
            AuditActionName.COMMAND_RESENT, step=step.name, kind=phase, attempt=attempt, worker=worker
        )

    def settle(self) -> None:
        repair.settle(self)

    def drop_timer(self, record: StepRuntime | LateCompensation) -> None:
        if record.timer_id is not None:
            self.cancel_timers.append(record.timer_id)
            record.timer_id = None

    def schedule_retry(self, step: WorkflowStep, phase: Phase, attempt: int) -> None:
        """Wait before dispatching ``attempt`` (the next one) of ``phase``."""
        rt = self.saga.step(step.name)
        rt.status = StepStatus.RETRY_WAIT if phase == "execute" else StepStatus.COMPENSATION_RETRY_WAIT
        rt.timer_id = self.retry_timer(
            command_id(self.saga.transaction_id, step.name, phase, attempt, self.saga.run_id),
            step,
            phase,
            attempt,
        )
        rt.command_id = None
        self.record(
            AuditActionName.RETRY_SCHEDULED, step=step.name, kind=phase, attempt=attempt, error=rt.error
        )

    def retry_timer(self, cid: str, step: WorkflowStep, phase: Phase, attempt: int) -> str:
        """Set the timer that dispatches ``attempt`` (command ``cid``) after the retry policy's delay;
        its id."""
        delay = self.definition.retry_for(step, phase).delay(attempt - 1)
        timer = Timer(
            f"{cid}:retry",
            self.saga.transaction_id,
            self.now.timestamp() + delay,
            "retry",
            step.name,
            phase,
            attempt,
        )
        self.timers.append(timer)
        return timer.timer_id

    # ---------------------------------------------------------------- events

    def result(self, event: StepResult) -> Transition:
        body = event.body
        step = self.definition.step(body.step)
        if step is None:
            return self.unchanged(f"workflow {self.definition.get_id()!r} has no step {body.step!r}")
        if body.kind == "compensate":
            answered = late.on_result(self, body)
            if answered is not None:
                return answered
        rt = self.saga.step(step.name)
        awaited = rt.command_id == body.command_id and (
            (body.kind == "execute" and rt.status is StepStatus.RUNNING)
            or (body.kind == "compensate" and rt.status is StepStatus.COMPENSATING)
        )
        if not awaited:
            return late.unawaited_result(self, step, rt, body)
        self.drop_timer(rt)
        if body.status == "succeeded":
            if body.kind == "execute":
                self.step_succeeded(step, rt, body.result or {}, body.command_id, body.attempt)
            else:
                self.compensation_succeeded(step, rt, body.attempt)
            return self.done()
        message, retryable = body.failure()
        self.attempt_failed(step, rt, body.kind, message, retryable=retryable)
        return self.done()

    def compensation_succeeded(self, step: WorkflowStep, rt: StepRuntime, attempt: int) -> None:
        rt.status = StepStatus.COMPENSATED
        rt.command_id = None
        self.record(
            AuditActionName.COMPENSATION_SUCCEEDED, step=step.name, kind="compensate", attempt=attempt
        )
        self.next_compensation()

    def step_succeeded(
        self, step: WorkflowStep, rt: StepRuntime, result: dict[str, object], cid: str, attempt: int
    ) -> None:
        rt.status = StepStatus.SUCCEEDED
        rt.succeeded_command = rt.command_id = cid
        rt.error = None
        self.saga.step_results[step.name] = dict(result)
        self.saga.data.update(result)
        self.saga.completed.append(step.name)
        self.record(AuditActionName.STEP_SUCCEEDED, step=step.name, kind="execute", attempt=attempt)
        self.stage_progress()

    def stage_progress(self) -> None:
        """After a step of the current stage settled: move on, or start compensating once it is still."""
        steps = self.stage_steps()
        settled = all(self.saga.step(s.name).status in _SETTLED for s in steps)
        if not settled:
            return
        if self.saga.state is WorkflowState.RUNNING:
            self.enter_stage(self.saga.stage + 1)
        elif self.saga.state is WorkflowState.COMPENSATING and not self.saga.compensation_queue:
            self.start_compensations()

    def attempt_failed(
        self, step: WorkflowStep, rt: StepRuntime, phase: Phase, error: str, *, retryable: bool
    ) -> None:
        rt.error = error
        attempt = rt.attempt if phase == "execute" else rt.compensation_attempt
        self.record(_FAILED_ATTEMPT[phase], step=step.name, kind=phase, attempt=attempt, error=error)
        may_retry = retryable and attempt <= self.definition.retry_for(step, phase).max_retries
        if phase == "compensate":
            if may_retry:
                self.schedule_retry(step, phase, attempt + 1)
                return
            rt.status = StepStatus.COMPENSATION_FAILED
            self.saga.error = late.with_failures(
                f"compensation of step {step.name!r} failed: {error}", late.failures(self.saga)
            )
            self.set_state(WorkflowState.FAILED, AuditActionName.SAGA_FAILED, error=self.saga.error)
            return
        if may_retry and self.saga.state is WorkflowState.RUNNING:
            self.schedule_retry(step, phase, attempt + 1)
            return
        rt.status = StepStatus.FAILED
        rt.command_id = None
        if self.saga.state is WorkflowState.RUNNING:
            self.rollback(f"step {step.name!r} failed: {error}")
        else:
            self.stage_progress()

    def timer(self, timer: Timer) -> Transition:
        answered = late.on_timer(self, timer)
        if answered is not None:
            return answered
        step = self.definition.step(timer.step)
        if step is None or self.saga.state.is_final:
            return self.unchanged("stale timer")
        rt = self.saga.step(step.name)
        if rt.timer_id != timer.timer_id:
            return self.unchanged("stale timer")
        rt.timer_id = None
        if timer.kind == "retry":
            self.dispatch(step, timer.phase, timer.attempt)
        else:
            timeout = step.timeout_of(timer.phase)
            assert timeout is not None
            self.record(
                AuditActionName.STEP_TIMED_OUT, step=step.name, kind=timer.phase, attempt=timer.attempt
            )
            self.attempt_failed(step, rt, timer.phase, f"timed out after {timeout:g}s", retryable=True)
        return self.done()

    # ---------------------------------------------------------------- rolling back

    def rollback(self, reason: str) -> None:
        """A step failed for good: stop every retry in the current stage, wait for the branches
        still in flight, then compensate."""
        self.saga.error = reason
        self.set_state(WorkflowState.COMPENSATING, AuditActionName.COMPENSATION_STARTED, error=reason)
        for step in self.stage_steps():
            rt = self.saga.step(step.name)
            if rt.status is StepStatus.RETRY_WAIT:
                self.drop_timer(rt)
                rt.status = StepStatus.FAILED
        self.stage_progress()

    def cancel(
        self, reason: str | None, action: AuditActionName = AuditActionName.CANCEL_REQUESTED
    ) -> Transition:
        if self.saga.state not in (WorkflowState.PENDING, WorkflowState.RUNNING):
            return self.unchanged(
                "cancel refused", rejected=f"a saga in state {self.saga.state.value!r} cannot be cancelled"
            )
        self.saga.cancel_requested = True
        self.saga.error = reason or "cancelled by request"
        self.set_state(WorkflowState.COMPENSATING, action, error=self.saga.error)
        self.stop_waiting()
        self.start_compensations()
        return self.done()

    def stop_waiting(self) -> None:
        """Stop waiting for the current stage's steps in flight or waiting to retry: their outcome is
        unknown, so they count as failed and are compensated first."""
        for step in self.stage_steps():
            rt = self.saga.step(step.name)
            if rt.status in AWAITING_EXECUTE:
                self.drop_timer(rt)
                rt.status = StepStatus.FAILED
                rt.command_id = None

    def start_compensations(self) -> None:
        # A failed step whose condition raised never ran: it has nothing to undo.
        failed = [
            step.name
            for step in reversed(self.stage_steps())
            if self.saga.step(step.name).status is StepStatus.FAILED and self.saga.step(step.name).attempt > 0
        ]
        self.saga.compensation_queue = [
            name for name in failed + list(reversed(self.saga.completed)) if self._compensable(name)
        ]
        if not self.saga.compensation_queue:
            self.finish_rollback()
            return
        self.dispatch_compensation()

    def _compensable(self, name: str) -> bool:
        step = self.definition.step(name)
        return step is not None and step.compensation is not None

    def dispatch_compensation(self) -> None:
        name = self.saga.compensation_queue[0]
        step = self.definition.step(name)
        assert step is not None
        self.saga.current_step = name
        self.dispatch(step, "compensate", 1)

    def next_compensation(self) -> None:
        if self.saga.compensation_queue:
            self.saga.compensation_queue.pop(0)
        if self.saga.compensation_queue:
            self.dispatch_compensation()
        else:
            self.finish_rollback()

    def finish_rollback(self) -> None:
        if late.failures(self.saga):
            late.fail_saga(self)
        elif self.saga.cancel_requested:
            self.set_state(WorkflowState.CANCELLED, AuditActionName.SAGA_CANCELLED, error=self.saga.error)
        else:
            self.set_state(WorkflowState.COMPENSATED, AuditActionName.SAGA_COMPENSATED, error=self.saga.error)
