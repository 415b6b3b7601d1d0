"""Property tests of the engine (DESIGN section 9): for any workflow shape and any behaviour of the
workers (failures, timeouts, duplicates, reordering, late answers, a cancel at any point) the saga ends
in a final state, and compensations run exactly for the failed or in-flight steps and the completed steps
that have one, in the order of DESIGN section 4, each once.

Each test checks one family of properties on the same simulation (see ``engine_sim.simulate``), so a
broken rule shows up as the one test that fails.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from hypothesis import HealthCheck, Phase, event, given, note, settings
from hypothesis import strategies as st

from orchestrator_kafka.context import WorkflowState
from orchestrator_kafka.engine import TimerFired
from orchestrator_kafka.models import CancelSaga, CommandBody, StepResult

from .engine_sim import TX, Run, Shape, StepSpec, actions, audit_actions, simulate

# No shrinking: a random world shrinks poorly and slowly; a failing example prints its full trace instead.
SETTINGS = settings(
    max_examples=300,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow],
)


@contextmanager
def explained(run: Run) -> Iterator[None]:
    """On a failed check, print the run's trace with the failing example."""
    try:
        yield
    except AssertionError:
        note(run.trace())
        raise


ROLLED_BACK = (WorkflowState.COMPENSATED, WorkflowState.CANCELLED)


@st.composite
def shapes(draw: st.DrawFn, timeouts: bool = False) -> Shape:
    """1 to 6 stages, some of them parallel groups; ``timeouts``: every step has one."""
    stages = []
    data: dict[str, bool] = {}
    for i in range(draw(st.integers(1, 6))):
        width = draw(st.sampled_from([1, 1, 2, 3]))
        stage = []
        for branch in "abc"[:width]:
            condition = None
            if width == 1 and draw(st.integers(0, 3)) == 0:
                condition = f"c{i}"
                data[condition] = draw(st.booleans())
            stage.append(
                StepSpec(
                    name=f"s{i}{branch}",
                    compensation=draw(st.integers(0, 9)) < 7,
                    timeout=draw(st.sampled_from([2.0, 5.0] if timeouts else [None, None, 2.0, 5.0])),
                    condition=condition,
                    retries=draw(st.sampled_from([None, None, None, 0, 1, 2])),
                )
            )
        stages.append(tuple(stage))
    return Shape(tuple(stages), draw(st.integers(0, 2)), data)


@dataclass
class Facts:
    """What happened in a run, read off the log (not off the engine's own bookkeeping)."""

    commands: list[tuple[int, str, CommandBody]] = field(default_factory=list)
    executes: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    compensations: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    late: list[tuple[int, str, str]] = field(default_factory=list)  # (log index, step, "late-<n>")
    late_attempts: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))  # by late-<n>
    counted: dict[str, tuple[int, StepResult]] = field(default_factory=dict)  # the success a step took
    counted_order: list[str] = field(default_factory=list)
    compensated: list[str] = field(default_factory=list)  # accepted primary compensation successes
    first_success: dict[str, tuple[int, StepResult]] = field(default_factory=dict)  # execute, by command id
    cancel_accepted: bool = False

    @classmethod
    def of(cls, run: Run) -> Facts:
        f = cls()
        for entry in run.log:
            event, t = entry.event, entry.transition
            if (
                isinstance(event, StepResult)
                and event.body.kind == "execute"
                and event.body.status == "succeeded"
            ):
                f.first_success.setdefault(event.body.command_id, (entry.index, event))
            if isinstance(event, CancelSaga) and t.changed:
                f.cancel_accepted = True
            for topic, command in t.commands:
                body = command.body
                f.commands.append((entry.index, topic, body))
                label = body.command_id.rsplit(":", 1)[1]
                if label.startswith("late-"):
                    late, _, attempt = label.partition(".")
                    f.late_attempts[f"{body.step}:{late}"].append(body.attempt)
                    if attempt == "1":
                        f.late.append((entry.index, body.step, late))
                elif body.kind == "execute":
                    f.executes[body.step].append(body.attempt)
                else:
                    f.compensations[body.step].append(body.attempt)
            for audit in audit_actions(t):
                action, step = audit.action, audit.step
                if action == "step_succeeded":
                    assert step is not None and step not in f.counted, f"{step} succeeded twice"
                    assert isinstance(event, StepResult), f"{step} succeeded on {event!r}"
                    assert (event.body.step, event.body.kind, event.body.status) == (
                        step,
                        "execute",
                        "succeeded",
                    )
                    f.counted[step] = (entry.index, event)
                    f.counted_order.append(step)
                elif action == "compensation_succeeded":
                    assert isinstance(event, StepResult) and step is not None
                    assert (event.body.step, event.body.kind, event.body.status) == (
                        step,
                        "compensate",
                        "succeeded",
                    )
                    f.compensated.append(step)
        return f

    def executed(self) -> set[str]:
        return set(self.executes)


def skipped(run: Run) -> set[str]:
    return {
        s.name for stage in run.shape.stages for s in stage if s.condition and not run.shape.data[s.condition]
    }


def failing_stage(run: Run, f: Facts) -> int:
    return max(run.definition.stage_of(step) for step in f.executed())


def expected_compensations(run: Run, f: Facts) -> list[str]:
    """DESIGN 4: the failed or in-flight steps of the stage the saga stopped in (reverse definition
    order), then every completed step in reverse completion order; only steps that have a compensation."""
    d = run.definition
    if not f.executed():
        return []
    stage = d.stages[failing_stage(run, f)]
    unfinished = [s.name for s in reversed(stage) if s.name in f.executed() and s.name not in f.counted]
    names = unfinished + list(reversed(f.counted_order))
    return [n for n in names if d.step(n).compensation is not None]  # type: ignore[union-attr]


def max_attempts(run: Run, step: str) -> int:
    spec = run.definition.step(step)
    assert spec is not None
    return run.definition.retry_for(spec).max_retries + 1


def trigger(run: Run, into: tuple[WorkflowState, ...]) -> tuple[str, bool]:
    """The step whose failure first moved the saga into one of ``into``, and whether that failure was
    non-retryable."""
    for entry in run.log:
        before, after = entry.before, entry.transition.saga
        if before is None or after is None or before.state in into or after.state not in into:
            continue
        if isinstance(entry.event, TimerFired):
            assert entry.event.timer.kind == "timeout"
            return entry.event.timer.step, False
        assert isinstance(entry.event, StepResult) and entry.event.body.status == "failed"
        error = entry.event.body.error
        return entry.event.body.step, error is not None and not error.retryable
    raise AssertionError(f"nothing moved the saga into {into}")


def entered_failed(run: Run) -> int | None:
    """The log index of the transition that moved the saga into failed, if any did."""
    for entry in run.log:
        before, after = entry.before, entry.transition.saga
        if (
            before is not None
            and after is not None
            and before.state is not after.state is WorkflowState.FAILED
        ):
            return entry.index
    return None


def failed_for_a_late_success(run: Run) -> bool:
    """The saga failed because the compensation of a late success failed for good, not one of its own
    compensations: the transition into failed failed no compensation of a step."""
    index = entered_failed(run)
    return index is not None and "compensation_failed_attempt" not in actions(run.log[index].transition)


LATE_ACTIONS = {
    "late_success_compensated",
    "late_compensation_dispatched",
    "late_compensation_succeeded",
    "late_compensation_failed_attempt",
    "late_compensation_timed_out",
    "late_compensation_retry_scheduled",
    "late_compensation_failed",
}


ROLLING_BACK = (WorkflowState.COMPENSATING, WorkflowState.COMPENSATED)
FAILED = (WorkflowState.FAILED,)


# ====================================================================== the properties


def check_saga_ends_final_and_agrees_with_its_steps(run: Run) -> None:
    f = Facts.of(run)
    saga = run.saga
    assert saga.state.is_final, saga.state
    assert saga.current_step is None
    # Only the compensations of late successes outlive the saga's end.
    assert all(":late-" in timer_id for timer_id in run.timers_at_final), "a final saga left timers behind"
    assert all(late.failed for late in saga.late_runs.values()), "a late compensation never settled"
    d = run.definition
    reached = range(failing_stage(run, f) + 1) if f.executed() else range(len(d.stages))
    # Every step of every stage reached ran, unless its condition was false; no other step ran.
    assert f.executed() == {s.name for i in reached for s in d.stages[i]} - skipped(run)
    # step_results holds exactly the counted successes, with the counted attempt's result.
    assert saga.step_results == {name: dict(ev.body.result or {}) for name, (_, ev) in f.counted.items()}
    for name, attempts in f.executes.items():
        assert attempts == list(range(1, len(attempts) + 1)) and len(attempts) <= max_attempts(run, name)

    if saga.state is WorkflowState.COMPLETED:
        assert set(f.counted) == {s.name for s in d.get_steps()} - skipped(run)
        assert not f.compensations and saga.error is None
        assert not f.cancel_accepted
    else:
        assert saga.error
    if saga.state is WorkflowState.CANCELLED:
        assert f.cancel_accepted
    if saga.state is WorkflowState.COMPENSATED:
        assert not f.cancel_accepted
        step, fatal = trigger(run, ROLLING_BACK)
        assert d.stage_of(step) == failing_stage(run, f)
        assert fatal or len(f.executes[step]) == max_attempts(run, step), "rolled back before retries ran out"
    for label, attempts in f.late_attempts.items():
        step = label.split(":", 1)[0]
        assert attempts == list(range(1, len(attempts) + 1)) and len(attempts) <= max_attempts(run, step)
    # A late compensation gives up only once its retries are spent (or on a non-retryable error), and
    # then the saga ends failed: a side effect is left behind.
    for base, late_run in saga.late_runs.items():
        attempts = f.late_attempts[f"{late_run.step}:{base.rsplit(':', 1)[1]}"]
        last = f"{base}.{len(attempts)}"
        assert len(attempts) == max_attempts(run, late_run.step) or run.outcomes.get(last) == "fatal"
        assert saga.state is WorkflowState.FAILED
    # A late compensation is not retried after a non-retryable error it took.
    sent_ids = {body.command_id for _, _, body in f.commands}
    for entry in run.log:
        event = entry.event
        if (
            isinstance(event, StepResult)
            and ":late-" in event.body.command_id
            and event.body.error is not None
            and not event.body.error.retryable
            and entry.transition.changed
        ):
            base = event.body.command_id.split(".", 1)[0]
            assert f"{base}.{event.body.attempt + 1}" not in sent_ids, f"{base} retried after a fatal error"
    # After the saga's end, only the compensations of late successes go on, and the only change of state
    # is to failed, when one of them fails for good.
    ended = next(e.index for e in run.log if e.transition.saga and e.transition.saga.state.is_final)
    for entry in run.log[ended + 1 :]:
        done = actions(entry.transition)
        assert set(done) <= LATE_ACTIONS | {"saga_failed"}, done
        assert "saga_failed" not in done or "late_compensation_failed" in done
    if failed_for_a_late_success(run):
        index = entered_failed(run)
        assert index is not None
        failed_late = [e for e in run.log[: index + 1] if "late_compensation_failed" in actions(e.transition)]
        assert failed_late, "failed for a late success that never failed"
        assert "of a late success" in (saga.error or "")
    elif saga.state is WorkflowState.FAILED:
        assert "compensation" in (saga.error or "")
        step, fatal = trigger(run, FAILED)
        assert step not in f.compensated
        assert fatal or len(f.compensations[step]) == max_attempts(run, step)


def check_compensations_run_once_each_in_design_order(run: Run) -> None:
    f = Facts.of(run)
    expected = expected_compensations(run, f)
    state = run.saga.state
    if state is WorkflowState.COMPLETED:
        assert f.compensated == [] and not f.compensations
    elif state in ROLLED_BACK or failed_for_a_late_success(run):
        assert f.compensated == expected
    else:
        assert state is WorkflowState.FAILED
        done = len(f.compensated)
        assert f.compensated == expected[:done] and done < len(expected)
        assert trigger(run, FAILED)[0] == expected[done]
    # Primary compensations: attempts 1, 2, ... of the expected steps only, one step at a time.
    assert set(f.compensations) <= set(expected)
    for name, attempts in f.compensations.items():
        assert attempts == list(range(1, len(attempts) + 1)) and len(attempts) <= max_attempts(run, name)
    first_dispatch = [
        b.step for _, _, b in f.commands if b.kind == "compensate" and ":late-" not in b.command_id
    ]
    assert list(dict.fromkeys(first_dispatch)) == expected[: len(set(first_dispatch))]


def check_command_ids_topics_timers_and_versions(run: Run) -> None:
    f = Facts.of(run)
    d = run.definition
    ids = [body.command_id for _, _, body in f.commands]
    assert len(ids) == len(set(ids)), "a command was dispatched twice"
    for _, topic, body in f.commands:
        step = d.step(body.step)
        assert step is not None
        label = body.command_id.rsplit(":", 1)[1]
        late_label, _, late_attempt = label.partition(".")
        assert label == str(body.attempt) or (
            late_label.startswith("late-") and late_attempt == str(body.attempt)
        )
        assert body.command_id == f"{TX}:{run.saga.run_id}:{body.step}:{body.kind}:{label}"
        if body.kind == "execute":
            assert (topic, body.worker_name) == (f"saga.commands.{step.worker_name}", step.worker_name)
        else:
            assert (topic, body.worker_name) == (f"saga.compensations.{step.compensation}", step.compensation)
        assert body.timeout == step.timeout
    timer_ids = [timer.timer_id for entry in run.log for timer in entry.transition.timers]
    assert len(timer_ids) == len(set(timer_ids)), "a timer id was reused"
    versions = [e.transition.saga.version for e in run.log if e.transition.changed and e.transition.saga]
    assert versions == list(range(1, len(versions) + 1))


def check_late_successes_are_undone_exactly_when_needed(run: Run) -> None:
    """Attempts of a step are retries of one operation; a compensation undoes the step. So a success
    that arrives before the step's own compensation was dispatched is covered (it is the counted effect,
    or the step's compensation will undo it), and one that arrives after needs an extra compensation.
    An extra compensation must never answer the counted success, nor undo a success that still stands."""
    f = Facts.of(run)
    d = run.definition
    never = len(run.log)
    own: dict[str, int] = {}  # step -> log index of its first primary compensation
    for index, _, body in f.commands:
        if body.kind == "compensate" and ":late-" not in body.command_id:
            own.setdefault(body.step, index)
    extra: set[str] = set()
    for index, step, label in f.late:
        event = run.log[index].event
        assert isinstance(event, StepResult) and event.body.step == step and event.body.kind == "execute"
        assert event.body.status == "succeeded" and label == f"late-{event.body.attempt}"
        counted = f.counted.get(step)
        assert counted is None or counted[1].body.command_id != event.body.command_id, (
            f"extra compensation of {step}'s counted success {event.body.command_id}"
        )
        assert counted is None or counted[0] > index or own.get(step, never) < index, (
            f"extra compensation of {step} while its counted success stands"
        )
        extra.add(event.body.command_id)
    for cid, (index, event) in f.first_success.items():
        step = event.body.step
        if d.step(step).compensation is not None and own.get(step, never) < index:  # type: ignore[union-attr]
            assert cid in extra, f"{cid} succeeded after {step} was compensated and was left behind"


# ====================================================================== the tests


def describe(run: Run) -> None:
    """Statistics for ``pytest --hypothesis-show-statistics``: which paths the runs took."""
    event(f"ends {run.saga.state.value}")
    f = Facts.of(run)
    if f.late:
        event("late success compensated")
    if any(len(a) > 1 for a in f.late_attempts.values()):
        event("a late compensation retried")
    if failed_for_a_late_success(run):
        event("failed for a late success")
    if any(len(a) > 1 for a in f.executes.values()):
        event("a step retried")
    if any(len(a) > 1 for a in f.compensations.values()):
        event("a compensation retried")
    if any(len(stage) > 1 for stage in run.definition.stages):
        event("has a parallel group")


@SETTINGS
@given(shape=shapes(), seed=st.integers(0, 2**32 - 1))
def test_saga_ends_final_and_agrees_with_its_steps(shape: Shape, seed: int) -> None:
    run = simulate(shape, random.Random(seed))
    describe(run)
    with explained(run):
        check_saga_ends_final_and_agrees_with_its_steps(run)


@SETTINGS
@given(shape=shapes(), seed=st.integers(0, 2**32 - 1))
def test_compensations_run_once_each_in_design_order(shape: Shape, seed: int) -> None:
    run = simulate(shape, random.Random(seed))
    describe(run)
    with explained(run):
        check_compensations_run_once_each_in_design_order(run)


@SETTINGS
@given(shape=shapes(), seed=st.integers(0, 2**32 - 1))
def test_command_ids_topics_timers_and_versions(shape: Shape, seed: int) -> None:
    run = simulate(shape, random.Random(seed))
    describe(run)
    with explained(run):
        check_command_ids_topics_timers_and_versions(run)


@SETTINGS
@given(shape=shapes(), seed=st.integers(0, 2**32 - 1))
def test_late_successes_are_undone_exactly_when_needed(shape: Shape, seed: int) -> None:
    run = simulate(shape, random.Random(seed))
    describe(run)
    with explained(run):
        check_late_successes_are_undone_exactly_when_needed(run)


@settings(SETTINGS, max_examples=1000)
@given(shape=shapes(timeouts=True), seed=st.integers(0, 2**32 - 1))
def test_late_successes_with_slow_workers(shape: Shape, seed: int) -> None:
    """The same, in a world built for late answers: every step has a timeout, workers answer after it,
    some answers (and duplicates) arrive only at the very end, and steps fail for good more often."""
    run = simulate(shape, random.Random(seed), slow=True)
    describe(run)
    with explained(run):
        check_late_successes_are_undone_exactly_when_needed(run)
        check_saga_ends_final_and_agrees_with_its_steps(run)
