"""A small, pure harness around :func:`orchestrator_kafka.engine.decide` for the unit tests.

:class:`Driver` feeds one saga event by event and keeps what the engine asked for: every command it
dispatched and the timers that are still set. It checks the version rule on every transition.

:func:`simulate` runs a random "world" of workers against a workflow: results are delivered in any
order, some twice, some never (the step's timeout fires instead), timers fire in any order (a few twice)
and a cancel may arrive at any point; with ``repairs``, an operator's repairs too (see :func:`simulate`).
It returns a :class:`Run`, the full log, for the property tests.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from orchestrator_kafka import codec
from orchestrator_kafka.context import SagaContext, WorkflowState
from orchestrator_kafka.engine import Event, TimerFired, Transition, decide
from orchestrator_kafka.models import (
    AuditAction,
    CancelBody,
    CancelSaga,
    CommandBody,
    ErrorInfo,
    RepairAction,
    RepairBody,
    RepairSaga,
    ResultBody,
    StartBody,
    StartSaga,
    StepCommand,
    StepResult,
    run_id_of,
)
from orchestrator_kafka.ports import Timer
from orchestrator_kafka.workflow import RetryPolicy, WorkflowBuilder, WorkflowDefinition

T0 = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)
TX = "tx-1"


def start_id(tx: str = TX) -> str:
    """The event id of the start of saga ``tx`` here: fixed, so its run id is known."""
    return f"start:{tx}"


# The run id of saga TX started at T0, in every command id it sends.
RUN = run_id_of(start_id(), T0)
_event_ids = itertools.count(1)


def _event_id() -> str:
    return f"ev-{next(_event_ids)}"


def start_event(
    definition: WorkflowDefinition, data: dict[str, Any] | None = None, tx: str = TX
) -> StartSaga:
    return StartSaga(
        event_id=start_id(tx),
        transaction_id=tx,
        workflow_id=definition.get_id(),
        occurred_at=T0,
        body=StartBody(context=dict(data or {})),
    )


def cancel_event(definition: WorkflowDefinition, tx: str = TX, reason: str | None = None) -> CancelSaga:
    return CancelSaga(
        event_id=_event_id(),
        transaction_id=tx,
        workflow_id=definition.get_id(),
        occurred_at=T0,
        body=CancelBody(reason=reason),
    )


def repair_event(
    definition: WorkflowDefinition,
    action: RepairAction,
    *,
    step: str | None = None,
    reason: str | None = None,
    run_id: str | None = None,
    event_id: str | None = None,
    tx: str = TX,
) -> RepairSaga:
    """An operator's repair request of saga ``tx`` (a fresh event id unless given)."""
    return RepairSaga(
        event_id=event_id or _event_id(),
        transaction_id=tx,
        workflow_id=definition.get_id(),
        occurred_at=T0,
        body=RepairBody(action=action, run_id=run_id, step=step, reason=reason),
    )


def result_event(
    command: StepCommand | CommandBody,
    *,
    ok: bool = True,
    result: dict[str, Any] | None = None,
    retryable: bool = True,
    workflow_id: str = "wf",
    tx: str = TX,
) -> StepResult:
    """The worker's answer to ``command``: a success with ``result``, or a failure."""
    body = command.body if isinstance(command, StepCommand) else command
    if isinstance(command, StepCommand):
        workflow_id, tx = command.workflow_id, command.transaction_id
    return StepResult(
        event_id=_event_id(),
        transaction_id=tx,
        workflow_id=workflow_id,
        occurred_at=T0,
        body=ResultBody(
            command_id=body.command_id,
            step=body.step,
            kind=body.kind,
            attempt=body.attempt,
            status="succeeded" if ok else "failed",
            result=result if ok else None,
            error=None if ok else ErrorInfo(type="Boom", message="it broke", retryable=retryable),
        ),
    )


def check_transition(before: SagaContext | None, t: Transition) -> None:
    """The version rule: +1 per changed transition, unchanged otherwise; audit carries the version. Every
    outgoing message, built by the fast builders of ``models``, is its wire model's JSON byte for byte."""
    for outgoing in t.outgoing:
        assert outgoing.encode() == codec.encode(outgoing.message())
    if t.changed:
        assert t.saga is not None
        assert t.saga.version == (before.version if before is not None else 0) + 1
        assert t.audit is not None and t.audit.body.version == t.saga.version
        assert t.audit.transaction_id == t.saga.transaction_id
        assert t.audit.body.to_state == t.saga.state.value
        assert t.audit.body.from_state == (before.state.value if before is not None else None)
    else:
        assert not t.commands and not t.timers and not t.cancel_timers and t.audit is None
        if before is None:
            assert t.saga is None
        else:
            assert t.saga is not None and t.saga.version == before.version


@dataclass
class Driver:
    """Feeds events to one saga and remembers what the engine asked for."""

    definition: WorkflowDefinition
    now: datetime = T0
    saga: SagaContext | None = None
    commands: list[tuple[str, StepCommand]] = field(default_factory=list)
    timers: dict[str, Timer] = field(default_factory=dict)
    transitions: list[Transition] = field(default_factory=list)

    def feed(self, event: Event) -> Transition:
        before = self.saga
        t = decide(self.definition, before, event, self.now)
        check_transition(before, t)
        self.transitions.append(t)
        if t.changed:
            self.saga = t.saga
        self.commands.extend(t.commands)
        for timer_id in t.cancel_timers:
            self.timers.pop(timer_id, None)
        for timer in t.timers:
            self.timers[timer.timer_id] = timer
        return t

    @property
    def state(self) -> str:
        assert self.saga is not None
        return self.saga.state.value

    def start(self, **data: Any) -> Transition:
        return self.feed(start_event(self.definition, data))

    def cancel(self, reason: str | None = None) -> Transition:
        return self.feed(cancel_event(self.definition, reason=reason))

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)

    def command(self, step: str, kind: str = "execute", attempt: int | str | None = None) -> StepCommand:
        """The last command dispatched for ``step`` of ``kind`` (and ``attempt``, if given)."""
        for _, cmd in reversed(self.commands):
            if cmd.body.step != step or cmd.body.kind != kind:
                continue
            if attempt is None or cmd.body.command_id.endswith(f":{attempt}"):
                return cmd
        raise AssertionError(f"no {kind} command for {step!r} (attempt {attempt})")

    def succeed(
        self, step: str, result: dict[str, Any] | None = None, *, kind: str = "execute", attempt: Any = None
    ) -> Transition:
        return self.feed(result_event(self.command(step, kind, attempt), result=result or {}))

    def fail(
        self, step: str, *, kind: str = "execute", retryable: bool = True, attempt: Any = None
    ) -> Transition:
        return self.feed(result_event(self.command(step, kind, attempt), ok=False, retryable=retryable))

    def timer(self, step: str, kind: str = "timeout") -> Timer:
        """The one active timer of ``kind`` for ``step``."""
        found = [t for t in self.timers.values() if t.step == step and t.kind == kind]
        assert len(found) == 1, f"expected one {kind} timer for {step!r}, found {found}"
        return found[0]

    def fire(self, timer: Timer) -> Transition:
        """Fire ``timer`` at its due time (the clock never goes back)."""
        self.timers.pop(timer.timer_id, None)
        due = datetime.fromtimestamp(timer.due_at, UTC)
        self.now = max(self.now, due)
        return self.feed(TimerFired(timer))


def audit_actions(t: Transition) -> list[AuditAction]:
    """The actions of ``t``'s audit record, in order (none for an unchanged transition)."""
    return list(t.audit.body.actions) if t.audit is not None else []


def actions(t: Transition) -> list[str]:
    return [a.action for a in audit_actions(t)]


def sent(t: Transition) -> list[tuple[str, str]]:
    """(topic, command_id) of every command of ``t``, in order."""
    return [(topic, cmd.body.command_id) for topic, cmd in t.commands]


# ====================================================================== the property-test simulator


@dataclass(frozen=True)
class StepSpec:
    name: str
    compensation: bool
    timeout: float | None = None
    condition: str | None = None  # the initial-data key that must be true for the step to run
    retries: int | None = None  # the step's own RetryPolicy(max_retries=...), else the workflow's


@dataclass(frozen=True)
class Shape:
    stages: tuple[tuple[StepSpec, ...], ...]
    max_retries: int
    data: dict[str, bool]


def _flag_is_set(key: str) -> Callable[[SagaContext], bool]:
    return lambda ctx: bool(ctx.get(key))


def build(shape: Shape) -> WorkflowDefinition:
    builder = WorkflowBuilder("wf").with_retry_config(
        max_retries=shape.max_retries, backoff_factor=2.0, initial_delay=1.0, max_delay=5.0
    )

    def kwargs(spec: StepSpec) -> dict[str, Any]:
        return {
            "compensation": f"undo-{spec.name}" if spec.compensation else None,
            "timeout": spec.timeout,
            "retry": None
            if spec.retries is None
            else RetryPolicy(max_retries=spec.retries, initial_delay=0.5),
        }

    for stage in shape.stages:
        if len(stage) > 1:
            builder.add_parallel_steps(
                [{"name": s.name, "worker_name": f"do-{s.name}", **kwargs(s)} for s in stage]
            )
        elif stage[0].condition is not None:
            builder.add_conditional_step(
                stage[0].name, f"do-{stage[0].name}", _flag_is_set(stage[0].condition), **kwargs(stage[0])
            )
        else:
            builder.add_step(stage[0].name, f"do-{stage[0].name}", **kwargs(stage[0]))
    return builder.build()


Outcome = Literal["ok", "fail", "fatal", "lost"]


@dataclass
class World:
    """How workers answer: drawn once per command id, with per-run odds."""

    rng: random.Random
    p_fail: float
    p_fatal: float
    p_lost: float
    p_comp_fail: float
    p_comp_fatal: float
    p_dup: float
    p_timer: float
    cancel_at: int | None
    p_hold: float = 0.0  # odds that an answer is held back until nothing else is left to happen
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    p_repair: float = 0.0  # odds that the next event is an operator's repair (simulate(repairs=True))
    healed: bool = False  # every compensation sent from now on succeeds (the cause was fixed)

    @classmethod
    def draw(cls, rng: random.Random, slow: bool | None = None) -> World:
        cancel_at = rng.choice([None, None, rng.randrange(1, 15)])
        if slow or (slow is None and rng.random() < 0.4):
            # Slow workers: timeouts fire before answers, which then arrive late, some twice.
            return cls(rng, 0.1, 0.2, 0.0, 0.2, 0.05, p_dup=0.6, p_timer=0.5, cancel_at=cancel_at, p_hold=0.5)
        return cls(
            rng=rng,
            p_fail=rng.choice([0.0, 0.1, 0.3]),
            p_fatal=rng.choice([0.0, 0.0, 0.05, 0.15]),
            p_lost=rng.choice([0.0, 0.2, 0.5]),
            p_comp_fail=rng.choice([0.0, 0.0, 0.2, 0.5]),
            p_comp_fatal=rng.choice([0.0, 0.0, 0.0, 0.05]),
            p_dup=rng.choice([0.0, 0.3, 0.6]),
            p_timer=rng.choice([0.1, 0.3, 0.6]),
            cancel_at=cancel_at,
            p_hold=rng.choice([0.0, 0.0, 0.1]),
        )

    def outcome(self, cmd: CommandBody, has_timeout: bool) -> Outcome:
        if cmd.command_id in self.outcomes:
            return self.outcomes[cmd.command_id]
        if self.healed and cmd.kind == "compensate":
            self.outcomes[cmd.command_id] = "ok"
            return "ok"
        r = self.rng.random()
        if cmd.kind == "execute":
            outcome: Outcome = (
                "fatal" if r < self.p_fatal else "fail" if r < self.p_fatal + self.p_fail else "ok"
            )
            if outcome == "ok" and has_timeout and self.rng.random() < self.p_lost:
                outcome = "lost"
        else:  # compensations, those of late successes included
            outcome = "fatal" if r < self.p_comp_fatal else "fail" if r < self.p_comp_fail else "ok"
            if outcome == "ok" and has_timeout and self.rng.random() < self.p_lost / 2:
                outcome = "lost"
        self.outcomes[cmd.command_id] = outcome
        return outcome


@dataclass(frozen=True)
class Entry:
    """One call of ``decide``: the event, the saga before it and the transition."""

    index: int
    event: Event
    before: SagaContext | None
    transition: Transition


@dataclass
class Run:
    definition: WorkflowDefinition
    shape: Shape
    log: list[Entry]
    saga: SagaContext
    outcomes: dict[str, Outcome]
    timers_at_final: set[str]  # timers still set right after the saga reached a final state
    # With repairs: (log index, timers still set) each time the saga entered a final state, and the
    # saga's state each time nothing was left to happen (the world's end, then after each healed retry).
    finals: list[tuple[int, set[str]]] = field(default_factory=list)
    quiet: list[tuple[int, WorkflowState, set[str]]] = field(default_factory=list)

    def trace(self) -> str:
        """The run, one line per event: what came in, the state after, what the engine did."""
        lines = []
        for entry in self.log:
            event, t = entry.event, entry.transition
            if isinstance(event, StepResult):
                what = f"result {event.body.command_id} {event.body.status}"
                if event.body.error is not None and not event.body.error.retryable:
                    what += " (non-retryable)"
            elif isinstance(event, TimerFired):
                what = f"timer {event.timer.timer_id}"
            elif isinstance(event, RepairSaga):
                body = event.body
                what = f"repair {event.event_id} {body.action} step={body.step} run={body.run_id}"
            else:
                what = type(event).__name__
            state = t.saga.state.value if t.saga is not None else "-"
            did = ", ".join(actions(t)) if t.changed else f"unchanged: {t.note}"
            sends = " ".join(cid for _, cid in sent(t))
            lines.append(f"{entry.index:3} {what} -> {state}: {did}" + (f" | sent {sends}" if sends else ""))
        return "\n".join(lines)


def simulate(
    shape: Shape,
    rng: random.Random,
    *,
    slow: bool | None = None,
    max_events: int = 3000,
    repairs: bool = False,
) -> Run:
    """Run a saga of ``shape`` against a random world (``slow``: always the slow-workers world).

    With ``repairs``, an operator also sends repairs at random points (``random_repair``: retry with or
    without a step, skip_compensation of a step, force_cancel; some for another run or without the
    reason they need, so refused; some sent again with the same event id), and a few more once nothing
    is left to happen. Then, while the saga is ``failed``, the world is healed (every compensation sent
    from then on succeeds, and its answer comes before any timer) and the operator retries it, up to a
    few times, each time until nothing is left to happen. ``Run.quiet`` has the saga's state at each of
    those points, ``Run.finals`` the timers left each time the saga entered a final state."""
    definition = build(shape)
    world = World.draw(rng, slow)
    if repairs:
        world.p_repair = rng.choice([0.02, 0.05, 0.1])
    log: list[Entry] = []
    pool: list[StepResult] = []  # results on their way back, delivered in any order
    held: list[StepResult] = []  # results delivered only once nothing else is left (very late)
    copies: dict[str, int] = {}
    timers: dict[str, Timer] = {}
    fired: list[Timer] = []
    saga: SagaContext | None = None
    now = T0
    timers_at_final: set[str] | None = None
    finals: list[tuple[int, set[str]]] = []
    quiet: list[tuple[int, WorkflowState, set[str]]] = []
    sent_repairs: list[RepairSaga] = []
    steps = [step.name for step in definition.get_steps()]

    def feed(event: Event) -> None:
        nonlocal saga, timers_at_final
        stored = saga.to_json() if saga is not None else None
        was_final = saga is not None and saga.state.is_final
        t = decide(definition, saga, event, now)
        assert stored is None or saga is None or saga.to_json() == stored, "decide changed its input saga"
        check_transition(saga, t)
        log.append(Entry(len(log), event, saga, t))
        if t.changed:
            saga = t.saga
        for timer_id in t.cancel_timers:
            timers.pop(timer_id, None)
        for timer in t.timers:
            assert timer.timer_id not in timers, f"timer {timer.timer_id} set twice"
            timers[timer.timer_id] = timer
        if timers_at_final is None and saga is not None and saga.state.is_final:
            timers_at_final = set(timers)
        if repairs and not was_final and saga is not None and saga.state.is_final:
            finals.append((len(log) - 1, set(timers)))
        for _, cmd in t.commands:
            step = definition.step(cmd.body.step)
            assert step is not None
            outcome = world.outcome(cmd.body, step.timeout is not None)
            if outcome != "lost":
                answer = result_event(
                    cmd,
                    ok=outcome == "ok",
                    result={f"r_{cmd.body.step}": cmd.body.attempt},
                    retryable=outcome != "fatal",
                )
                # Healed workers answer at once, before any timer.
                (held if not world.healed and rng.random() < world.p_hold else pool).append(answer)

    def random_repair() -> RepairSaga:
        if sent_repairs and rng.random() < 0.2:
            return rng.choice(sent_repairs)  # sent again (a timeout at the client): the same event id
        assert saga is not None
        action: RepairAction = rng.choice(["retry", "retry", "skip_compensation", "force_cancel"])
        # Mostly a step a repair applies to (a compensation under way or failed, a command awaited or
        # waiting, a late success's compensation); else any step, which the engine may refuse.
        targets = sorted(
            {name for name, rt in saga.steps.items() if rt.status.value.startswith(("compensat", "r"))}
            | {c.step for c in saga.late_runs.values()}
        )
        step = None
        if action == "skip_compensation" or rng.random() < 0.3:
            step = rng.choice(targets) if targets and rng.random() < 0.7 else rng.choice(steps)
        reason = None if action == "skip_compensation" and rng.random() < 0.1 else "by hand"
        r = rng.random()
        run_id = None if r < 0.5 else saga.run_id if r < 0.9 else "0123456789abcdef"
        request = repair_event(definition, action, step=step, reason=reason, run_id=run_id)
        sent_repairs.append(request)
        return request

    def run_world(count: int, operator: bool) -> int:
        """Deliver events until nothing is left to happen (``operator``: repairs at random, and a few
        once all is quiet); the number of events delivered so far."""
        nonlocal now
        quiet_repairs = 3 if operator else 0
        while count < max_events:
            count += 1
            if world.cancel_at is not None and count - 1 == world.cancel_at:
                feed(cancel_event(definition, reason="user"))
                continue
            if operator and rng.random() < world.p_repair:
                feed(random_repair())
                continue
            now += timedelta(milliseconds=rng.randrange(1, 500))
            if fired and rng.random() < 0.03:
                feed(TimerFired(rng.choice(fired)))  # a timer delivered twice (lease expired)
            elif timers and (not pool or (not world.healed and rng.random() < world.p_timer)):
                ordered = sorted(timers.values(), key=lambda t: (t.due_at, t.timer_id))
                timer = ordered[0] if rng.random() < 0.7 else rng.choice(ordered)
                del timers[timer.timer_id]
                fired.append(timer)
                now = max(now, datetime.fromtimestamp(timer.due_at, UTC))
                feed(TimerFired(timer))
            elif pool:
                message = pool.pop(rng.randrange(len(pool)))
                cid = message.body.command_id
                if rng.random() < world.p_dup and copies.get(cid, 0) < 2:
                    copies[cid] = copies.get(cid, 0) + 1
                    again = (
                        message.model_copy(update={"event_id": _event_id()})
                        if rng.random() < 0.5
                        else message
                    )
                    if rng.random() < world.p_hold:
                        held.append(again)
                    else:
                        pool.insert(rng.randrange(len(pool) + 1), again)
                feed(message)
            elif held:
                pool.extend(held)
                held.clear()
            elif quiet_repairs and rng.random() < 0.5:
                quiet_repairs -= 1
                feed(random_repair())
            else:
                return count - 1
        raise AssertionError(f"not quiescent after {max_events} events")

    feed(start_event(definition, shape.data))
    count = run_world(0, repairs)
    assert saga is not None
    if repairs:
        quiet.append((len(log), saga.state, set(timers)))
        world.healed, world.cancel_at = True, None
        for _ in range(4):
            if saga.state is not WorkflowState.FAILED:
                break
            feed(repair_event(definition, "retry", reason="fixed", run_id=saga.run_id))
            count = run_world(count, operator=False)
            quiet.append((len(log), saga.state, set(timers)))
    return Run(definition, shape, log, saga, world.outcomes, timers_at_final or set(), finals, quiet)
