"""The saga state machine: ``decide(definition, saga, event, now) -> Transition``.

Pure: no I/O, no asyncio, no clock of its own. Every rule of DESIGN section 4 lives here: sequential,
conditional and parallel steps; retries as durable timers; step timeouts; compensation order;
cancellation; duplicate, stale and late results. The orchestrator persists what it returns atomically
and publishes its commands and audit events.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import orjson

from .constants import SCHEMA_VERSION, Topics
from .context import LateCompensation, SagaContext, StepRuntime, StepStatus, WorkflowState
from .models import (
    CancelSaga,
    ResultBody,
    SagaEvent,
    StartSaga,
    StepCommand,
    StepResult,
    derived_event_id,
)
from .values import Timer
from .workflow import WorkflowDefinition, WorkflowStep

Phase = Literal["execute", "compensate"]


@dataclass(frozen=True, slots=True)
class TimerFired:
    """A durable timer came due."""

    timer: Timer

    @property
    def event_id(self) -> str:
        return f"timer:{self.timer.timer_id}"


Event = StartSaga | CancelSaga | StepResult | TimerFired


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
_AWAITING_EXECUTE = (StepStatus.RUNNING, StepStatus.RETRY_WAIT)


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
        return _Run(definition, _new_saga(event, now), now, topics or _TOPICS).start()
    if saga is None:
        return Transition(None, False, note="unknown saga")
    run = _Run(definition, saga.copy(), now, topics or _TOPICS, original=saga)
    if isinstance(event, CancelSaga):
        return run.cancel(event.body.reason)
    if isinstance(event, StepResult):
        return run.result(event)
    return run.timer(event.timer)


def _new_saga(event: StartSaga, now: datetime) -> SagaContext:
    return SagaContext(
        transaction_id=event.transaction_id,
        workflow_id=event.workflow_id,
        state=WorkflowState.PENDING,
        data=dict(event.body.context),
        created_at=now,
        updated_at=now,
        version=0,
    )


def _failure(body: ResultBody) -> tuple[str, bool]:
    """A failed result's error as the saga records it, and whether it may be retried."""
    error = body.error
    if error is None:
        return "failed without an error", True
    return f"{error.type}: {error.message}", error.retryable


def command_id(transaction_id: str, step: str, phase: Phase, attempt: int | str) -> str:
    """The id of a command: unique per saga, step, phase and attempt."""
    return f"{transaction_id}:{step}:{phase}:{attempt}"


class _Run:
    """One decision in progress: a working copy of the saga and what the event produced."""

    __slots__ = (
        "actions",
        "cancel_timers",
        "d",
        "from_state",
        "from_version",
        "now",
        "original",
        "outgoing",
        "s",
        "timers",
        "topics",
    )

    def __init__(
        self,
        d: WorkflowDefinition,
        s: SagaContext,
        now: datetime,
        topics: Topics,
        original: SagaContext | None = None,
    ) -> None:
        self.d, self.s, self.now, self.topics, self.original = d, s, now, topics, original
        self.outgoing: list[Outgoing] = []
        self.timers: list[Timer] = []
        self.cancel_timers: list[str] = []
        self.actions: list[dict[str, object]] = []
        self.from_version = s.version
        self.from_state: WorkflowState | None = s.state

    # ---------------------------------------------------------------- output

    def done(self) -> Transition:
        s = self.s
        s.version = self.from_version + 1
        s.updated_at = self.now
        # The id is derived, so a record re-published from an outbox keeps it.
        audit = {
            "schema_version": SCHEMA_VERSION,
            "event_id": derived_event_id(f"{s.transaction_id}:{s.version}:audit"),
            "transaction_id": s.transaction_id,
            "workflow_id": s.workflow_id,
            "occurred_at": self.now,
            "event_type": "saga.transition",
            "body": {
                "from_state": self.from_state,
                "to_state": s.state,
                "version": s.version,
                "actions": self.actions,
            },
        }
        self.outgoing.append(Outgoing(self.topics.events, audit))
        return Transition(s, True, tuple(self.outgoing), tuple(self.timers), tuple(self.cancel_timers))

    def unchanged(self, note: str, rejected: str | None = None) -> Transition:
        return Transition(self.original or self.s, False, note=note, rejected=rejected)

    def record(
        self,
        action: str,
        *,
        step: str | None = None,
        kind: Phase | None = None,
        attempt: int | None = None,
        error: str | None = None,
        worker: str | None = None,
    ) -> None:
        self.actions.append(
            {
                "action": action,
                "state": self.s.state,
                "step": step,
                "worker_name": worker,
                "kind": kind,
                "attempt": attempt,
                "error": error,
            }
        )

    def set_state(self, state: WorkflowState, action: str, error: str | None = None) -> None:
        self.s.state = state
        if state.is_final:
            self.s.current_step = None
        self.record(action, error=error)

    # ---------------------------------------------------------------- start and stages

    def start(self) -> Transition:
        self.from_version, self.from_state = 0, None
        self.record("saga_created")
        self.enter_stage(0)
        return self.done()

    def enter_stage(self, index: int) -> None:
        stages = self.d.stages
        while index < len(stages):
            self.s.stage = index
            to_run: list[WorkflowStep] = []
            for step in stages[index]:
                if step.condition is not None:
                    try:
                        holds = bool(step.condition(self.s))
                    except Exception as exc:  # noqa: BLE001 - a user's condition must not crash the engine
                        error = f"condition of step {step.name!r} raised {type(exc).__name__}: {exc}"
                        self.s.step(step.name).status = StepStatus.FAILED
                        self.s.step(step.name).error = error
                        self.record("condition_failed", step=step.name, error=error)
                        self.rollback(error)
                        return
                    if not holds:
                        self.s.step(step.name).status = StepStatus.SKIPPED
                        self.record("step_skipped", step=step.name)
                        continue
                to_run.append(step)
            if to_run:
                if self.s.state is WorkflowState.PENDING:
                    self.set_state(WorkflowState.RUNNING, "saga_started")
                for step in to_run:
                    self.dispatch(step, "execute", 1)
                self.s.current_step = ",".join(step.name for step in to_run)
                return
            index += 1
        self.set_state(WorkflowState.COMPLETED, "saga_completed")

    def stage_steps(self) -> list[WorkflowStep]:
        return [
            step
            for step in self.d.stages[self.s.stage]
            if self.s.step(step.name).status is not StepStatus.SKIPPED
        ]

    # ---------------------------------------------------------------- commands and timers

    def dispatch(self, step: WorkflowStep, phase: Phase, attempt: int) -> None:
        rt = self.s.step(step.name)
        cid = command_id(self.s.transaction_id, step.name, phase, attempt)
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
        action = "step_dispatched" if phase == "execute" else "compensation_dispatched"
        self.record(action, step=step.name, kind=phase, attempt=attempt, worker=worker)

    def send_timed(
        self, cid: str, step: WorkflowStep, phase: Phase, attempt: int, worker: str, topic: str
    ) -> str | None:
        """:meth:`send`, and set the step's timeout timer for the command; its id, if the step has one."""
        self.send(cid, step, phase, attempt, worker, topic)
        if step.timeout is None:
            return None
        timer = Timer(
            f"{cid}:timeout",
            self.s.transaction_id,
            self.now.timestamp() + step.timeout,
            "timeout",
            step.name,
            phase,
            attempt,
            cid,
        )
        self.timers.append(timer)
        return timer.timer_id

    def send(self, cid: str, step: WorkflowStep, phase: Phase, attempt: int, worker: str, topic: str) -> None:
        payload = {
            "schema_version": SCHEMA_VERSION,
            "event_id": derived_event_id(cid),
            "transaction_id": self.s.transaction_id,
            "workflow_id": self.s.workflow_id,
            "occurred_at": self.now,
            "event_type": "step.command",
            "body": {
                "command_id": cid,
                "step": step.name,
                "worker_name": worker,
                "kind": phase,
                "attempt": attempt,
                "data": dict(self.s.data),
                "timeout": step.timeout,
            },
        }
        self.outgoing.append(Outgoing(topic, payload))

    def drop_timer(self, record: StepRuntime | LateCompensation) -> None:
        if record.timer_id is not None:
            self.cancel_timers.append(record.timer_id)
            record.timer_id = None

    def schedule_retry(self, step: WorkflowStep, phase: Phase, attempt: int) -> None:
        """Wait before dispatching ``attempt`` (the next one) of ``phase``."""
        rt = self.s.step(step.name)
        rt.status = StepStatus.RETRY_WAIT if phase == "execute" else StepStatus.COMPENSATION_RETRY_WAIT
        rt.timer_id = self.retry_timer(
            command_id(self.s.transaction_id, step.name, phase, attempt), step, phase, attempt
        )
        rt.command_id = None
        self.record("retry_scheduled", step=step.name, kind=phase, attempt=attempt, error=rt.error)

    def retry_timer(self, cid: str, step: WorkflowStep, phase: Phase, attempt: int) -> str:
        """Set the timer that dispatches ``attempt`` (command ``cid``) after the retry policy's delay;
        its id."""
        delay = self.d.retry_for(step).delay(attempt - 1)
        timer = Timer(
            f"{cid}:retry",
            self.s.transaction_id,
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
        step = self.d.step(body.step)
        if step is None:
            return self.unchanged(f"workflow {self.d.get_id()!r} has no step {body.step!r}")
        if body.kind == "compensate":
            late = self.late_run_of(body.command_id)
            if late is not None:
                return self.late_result(*late, body)
        rt = self.s.step(step.name)
        awaited = rt.command_id == body.command_id and (
            (body.kind == "execute" and rt.status is StepStatus.RUNNING)
            or (body.kind == "compensate" and rt.status is StepStatus.COMPENSATING)
        )
        if not awaited:
            return self.late(step, rt, event)
        self.drop_timer(rt)
        if body.status == "succeeded":
            if body.kind == "execute":
                self.step_succeeded(step, rt, body.result or {}, body.command_id, body.attempt)
            else:
                self.compensation_succeeded(step, rt, body.attempt)
            return self.done()
        message, retryable = _failure(body)
        self.attempt_failed(step, rt, body.kind, message, retryable=retryable)
        return self.done()

    def compensation_succeeded(self, step: WorkflowStep, rt: StepRuntime, attempt: int) -> None:
        rt.status = StepStatus.COMPENSATED
        rt.command_id = None
        self.record("compensation_succeeded", step=step.name, kind="compensate", attempt=attempt)
        self.next_compensation()

    def late(self, step: WorkflowStep, rt: StepRuntime, event: StepResult) -> Transition:
        body = event.body
        if body.status != "succeeded":
            return self.unchanged("stale result")
        sent = rt.attempt if body.kind == "execute" else rt.compensation_attempt
        if body.command_id != command_id(self.s.transaction_id, step.name, body.kind, body.attempt) or not (
            1 <= body.attempt <= sent
        ):
            # Not a command this saga sent (or the answer to an extra compensation): nothing to take.
            return self.unchanged("unknown command")
        if body.kind == "compensate":
            if rt.status in (StepStatus.COMPENSATING, StepStatus.COMPENSATION_RETRY_WAIT):
                # An earlier compensation attempt succeeded after all while the step still waits for one.
                self.drop_timer(rt)
                self.compensation_succeeded(step, rt, body.attempt)
                return self.done()
            return self.unchanged("stale result")
        if rt.status in _AWAITING_EXECUTE and self.s.state is WorkflowState.RUNNING:
            # An earlier attempt succeeded after all while the step still waits: take its success.
            self.drop_timer(rt)
            self.step_succeeded(step, rt, body.result or {}, body.command_id, body.attempt)
            return self.done()
        if rt.status is StepStatus.SUCCEEDED or rt.succeeded_command == body.command_id:
            return self.unchanged("duplicate result")
        if step.compensation is None or body.command_id in self.s.late_compensations:
            return self.unchanged("stale result")
        if rt.status is StepStatus.FAILED and self.s.state is WorkflowState.COMPENSATING:
            # Its own compensation is still to come in the rollback; that undoes this success too.
            return self.unchanged("compensation pending")
        # A success of an attempt the saga gave up on: undo it so no side effect is left behind.
        self.s.late_compensations.append(body.command_id)
        base = command_id(self.s.transaction_id, step.name, "compensate", f"late-{body.attempt}")
        self.s.late_runs[base] = LateCompensation(step.name)
        self.dispatch_late(step, base, 1, "late_success_compensated", body.attempt)
        return self.done()

    # ---------------------------------------------------------------- compensations of late successes

    def dispatch_late(self, step: WorkflowStep, base: str, attempt: int, action: str, shown: int) -> None:
        """Send ``attempt`` of the late compensation ``base``, and record it as ``action`` of attempt
        ``shown``. The first goes under ``base`` itself (the id the first release of this rule used),
        the next ones as ``<base>.<attempt>``."""
        assert step.compensation is not None
        run = self.s.late_runs[base]
        cid = base if attempt == 1 else f"{base}.{attempt}"
        run.attempt, run.command_id = attempt, cid
        topic = self.topics.compensations(step.compensation)
        run.timer_id = self.send_timed(cid, step, "compensate", attempt, step.compensation, topic)
        self.record(action, step=step.name, kind="compensate", attempt=shown, worker=step.compensation)

    def late_run_of(self, cid: str) -> tuple[str, LateCompensation, int] | None:
        """The late compensation that sent command ``cid`` (unsettled, or failed for good), and that
        command's attempt. Ids are matched exactly, never parsed: a result can carry any text."""
        for base, run in self.s.late_runs.items():
            if cid == base:
                return base, run, 1
            if cid.startswith(base):
                for attempt in range(2, run.attempt + 1):
                    if cid == f"{base}.{attempt}":
                        return base, run, attempt
        return None

    def late_result(self, base: str, run: LateCompensation, attempt: int, body: ResultBody) -> Transition:
        step = self.d.step(run.step)
        if step is None:
            return self.unchanged(f"workflow {self.d.get_id()!r} has no step {run.step!r}")
        if body.status == "succeeded":
            # Any attempt's success undoes the late success, even one the saga stopped waiting for or
            # gave up on (a saga it already failed stays failed: its audit says why).
            del self.s.late_runs[base]
            self.drop_timer(run)
            self.record("late_compensation_succeeded", step=step.name, kind="compensate", attempt=attempt)
            return self.done()
        if run.failed or attempt != run.attempt or run.command_id is None:
            return self.unchanged("stale result")
        self.drop_timer(run)
        message, retryable = _failure(body)
        self.late_attempt_failed(step, base, run, message, retryable=retryable)
        return self.done()

    def late_timer(self, base: str, run: LateCompensation, timer: Timer) -> Transition:
        step = self.d.step(run.step)
        if step is None or step.compensation is None:
            return self.unchanged("stale timer")
        run.timer_id = None
        if timer.kind == "retry":
            self.dispatch_late(step, base, timer.attempt, "late_compensation_dispatched", timer.attempt)
        else:
            assert step.timeout is not None
            # Actions of their own: the audit tells them from the step's own compensation's.
            self.record(
                "late_compensation_timed_out", step=step.name, kind="compensate", attempt=timer.attempt
            )
            self.late_attempt_failed(step, base, run, f"timed out after {step.timeout:g}s", retryable=True)
        return self.done()

    def late_attempt_failed(
        self, step: WorkflowStep, base: str, run: LateCompensation, error: str, *, retryable: bool
    ) -> None:
        """Retry a late compensation like any compensation; once its retries are spent, the saga ends
        failed (at once if it had ended, else when its rollback ends): a side effect is left behind."""
        run.error, run.command_id = error, None
        self.record(
            "late_compensation_failed_attempt",
            step=step.name,
            kind="compensate",
            attempt=run.attempt,
            error=error,
        )
        if retryable and run.attempt <= self.d.retry_for(step).max_retries:
            run.timer_id = self.retry_timer(f"{base}.{run.attempt + 1}", step, "compensate", run.attempt + 1)
            self.record(
                "late_compensation_retry_scheduled",
                step=step.name,
                kind="compensate",
                attempt=run.attempt + 1,
                error=error,
            )
            return
        run.failed = True
        self.record(
            "late_compensation_failed", step=step.name, kind="compensate", attempt=run.attempt, error=error
        )
        if self.s.state is WorkflowState.FAILED:
            self.s.error = self.with_late_failures(self.s.error, [run])
        elif self.s.state.is_final:
            self.fail_for_late()
        # Still rolling back: the rollback ends failed (finish_rollback), unless a late success of this
        # compensation comes first.

    def late_failures(self) -> list[LateCompensation]:
        return [run for run in self.s.late_runs.values() if run.failed]

    @staticmethod
    def with_late_failures(error: str | None, runs: list[LateCompensation]) -> str:
        """``error`` with the reason of each late compensation in ``runs`` that failed for good."""
        reasons = [f"the compensation of a late success of step {r.step!r} failed: {r.error}" for r in runs]
        return "; ".join([error, *reasons] if error else reasons)

    def fail_for_late(self) -> None:
        self.s.error = self.with_late_failures(self.s.error, self.late_failures())
        self.set_state(WorkflowState.FAILED, "saga_failed", error=self.s.error)

    def step_succeeded(
        self, step: WorkflowStep, rt: StepRuntime, result: dict[str, object], cid: str, attempt: int
    ) -> None:
        rt.status = StepStatus.SUCCEEDED
        rt.succeeded_command = rt.command_id = cid
        rt.error = None
        self.s.step_results[step.name] = dict(result)
        self.s.data.update(result)
        self.s.completed.append(step.name)
        self.record("step_succeeded", step=step.name, kind="execute", attempt=attempt)
        self.stage_progress()

    def stage_progress(self) -> None:
        """After a step of the current stage settled: move on, or start compensating once it is still."""
        steps = self.stage_steps()
        settled = all(self.s.step(s.name).status in (StepStatus.SUCCEEDED, StepStatus.FAILED) for s in steps)
        if not settled:
            return
        if self.s.state is WorkflowState.RUNNING:
            self.enter_stage(self.s.stage + 1)
        elif self.s.state is WorkflowState.COMPENSATING and not self.s.compensation_queue:
            self.start_compensations()

    def attempt_failed(
        self, step: WorkflowStep, rt: StepRuntime, phase: Phase, error: str, *, retryable: bool
    ) -> None:
        rt.error = error
        attempt = rt.attempt if phase == "execute" else rt.compensation_attempt
        self.record(
            "step_failed" if phase == "execute" else "compensation_failed_attempt",
            step=step.name,
            kind=phase,
            attempt=attempt,
            error=error,
        )
        may_retry = retryable and attempt <= self.d.retry_for(step).max_retries
        if phase == "compensate":
            if may_retry:
                self.schedule_retry(step, phase, attempt + 1)
                return
            rt.status = StepStatus.COMPENSATION_FAILED
            self.s.error = self.with_late_failures(
                f"compensation of step {step.name!r} failed: {error}", self.late_failures()
            )
            self.set_state(WorkflowState.FAILED, "saga_failed", error=self.s.error)
            return
        if may_retry and self.s.state is WorkflowState.RUNNING:
            self.schedule_retry(step, phase, attempt + 1)
            return
        rt.status = StepStatus.FAILED
        rt.command_id = None
        if self.s.state is WorkflowState.RUNNING:
            self.rollback(f"step {step.name!r} failed: {error}")
        else:
            self.stage_progress()

    def timer(self, timer: Timer) -> Transition:
        for base, run in self.s.late_runs.items():
            if run.timer_id == timer.timer_id:
                return self.late_timer(base, run, timer)
        step = self.d.step(timer.step)
        if step is None or self.s.state.is_final:
            return self.unchanged("stale timer")
        rt = self.s.step(step.name)
        if rt.timer_id != timer.timer_id:
            return self.unchanged("stale timer")
        rt.timer_id = None
        if timer.kind == "retry":
            self.dispatch(step, timer.phase, timer.attempt)
        else:
            assert step.timeout is not None
            self.record("step_timed_out", step=step.name, kind=timer.phase, attempt=timer.attempt)
            self.attempt_failed(step, rt, timer.phase, f"timed out after {step.timeout:g}s", retryable=True)
        return self.done()

    # ---------------------------------------------------------------- rolling back

    def rollback(self, reason: str) -> None:
        """A step failed for good: stop every retry in the current stage, wait for the branches
        still in flight, then compensate."""
        self.s.error = reason
        self.set_state(WorkflowState.COMPENSATING, "compensation_started", error=reason)
        for step in self.stage_steps():
            rt = self.s.step(step.name)
            if rt.status is StepStatus.RETRY_WAIT:
                self.drop_timer(rt)
                rt.status = StepStatus.FAILED
        self.stage_progress()

    def cancel(self, reason: str | None) -> Transition:
        if self.s.state not in (WorkflowState.PENDING, WorkflowState.RUNNING):
            return self.unchanged(
                "cancel refused", rejected=f"a saga in state {self.s.state.value!r} cannot be cancelled"
            )
        self.s.cancel_requested = True
        self.s.error = reason or "cancelled by request"
        self.set_state(WorkflowState.COMPENSATING, "cancel_requested", error=self.s.error)
        for step in self.stage_steps():
            rt = self.s.step(step.name)
            if rt.status in _AWAITING_EXECUTE:
                # In flight or waiting to retry: its outcome is unknown, so it is compensated first.
                self.drop_timer(rt)
                rt.status = StepStatus.FAILED
                rt.command_id = None
        self.start_compensations()
        return self.done()

    def start_compensations(self) -> None:
        # A failed step whose condition raised never ran: it has nothing to undo.
        failed = [
            step.name
            for step in reversed(self.stage_steps())
            if self.s.step(step.name).status is StepStatus.FAILED and self.s.step(step.name).attempt > 0
        ]
        self.s.compensation_queue = [
            name for name in failed + list(reversed(self.s.completed)) if self._compensable(name)
        ]
        if not self.s.compensation_queue:
            self.finish_rollback()
            return
        self.dispatch_compensation()

    def _compensable(self, name: str) -> bool:
        step = self.d.step(name)
        return step is not None and step.compensation is not None

    def dispatch_compensation(self) -> None:
        name = self.s.compensation_queue[0]
        step = self.d.step(name)
        assert step is not None
        self.s.current_step = name
        self.dispatch(step, "compensate", 1)

    def next_compensation(self) -> None:
        if self.s.compensation_queue:
            self.s.compensation_queue.pop(0)
        if self.s.compensation_queue:
            self.dispatch_compensation()
        else:
            self.finish_rollback()

    def finish_rollback(self) -> None:
        if self.late_failures():
            self.fail_for_late()
        elif self.s.cancel_requested:
            self.set_state(WorkflowState.CANCELLED, "saga_cancelled", error=self.s.error)
        else:
            self.set_state(WorkflowState.COMPENSATED, "saga_compensated", error=self.s.error)
