"""Property tests of the engine with an operator's repairs (``saga.repair``): the random worlds of
``test_engine_properties``, where an operator also sends repairs at random points (retry with or without
a step, skip_compensation of a step, force_cancel; some refused, some sent twice with the same
event id), then, while the saga is failed, heals the world and retries it (``engine_sim.simulate`` with
``repairs=True``).

The invariants are those of ``test_engine_properties``, adapted only where a repair legitimately changes
them; each adaptation says why in a comment. Added: no saga is ever left non-final with nothing left to
happen (stuck), and a failed saga whose compensations then succeed ends compensated or cancelled after
a retry.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from hypothesis import event, given, settings
from hypothesis import strategies as st

from orchestrator_kafka.context import SagaContext, StepStatus, WorkflowState
from orchestrator_kafka.models import CancelSaga, RepairSaga, StepResult
from orchestrator_kafka.repair import REPAIRS_KEPT, refusal

from .engine_sim import TX, Run, Shape, actions, audit_actions, simulate
from .test_engine_properties import (
    LATE_ACTIONS,
    SETTINGS,
    Facts,
    expected_compensations,
    explained,
    max_attempts,
    shapes,
    skipped,
)

ROLLED_BACK = (WorkflowState.COMPENSATED, WorkflowState.CANCELLED)
REPAIR_ACTIONS = {"retry_requested", "compensation_skipped", "force_cancel_requested"}
SKIPPABLE = (StepStatus.COMPENSATION_FAILED, StepStatus.COMPENSATING, StepStatus.COMPENSATION_RETRY_WAIT)


@dataclass
class Repairs:
    """What the operator's repairs did, read off the log."""

    applied: list[int] = field(default_factory=list)  # log indexes of the repairs applied
    retries: int = 0  # retries applied: each may send one attempt beyond the retry policy's
    cancelled: bool = False  # a cancel or force_cancel was applied
    # Steps whose own compensation a skip counted as done, with the log index.
    skipped: dict[str, int] = field(default_factory=dict)
    resent: set[str] = field(default_factory=set)  # command ids a retry sent again

    @classmethod
    def of(cls, run: Run) -> Repairs:
        r = cls()
        for entry in run.log:
            event, t, before = entry.event, entry.transition, entry.before
            if isinstance(event, CancelSaga) and t.changed:
                r.cancelled = True
            if not isinstance(event, RepairSaga) or not t.changed:
                continue
            r.applied.append(entry.index)
            body = event.body
            if body.action == "retry":
                r.retries += 1
            elif body.action == "force_cancel":
                r.cancelled = True
            elif before is not None and body.step is not None:
                rt = before.steps.get(body.step)
                if rt is not None and rt.status in SKIPPABLE:
                    r.skipped[body.step] = entry.index
            for audit in audit_actions(t):
                if audit.action == "command_resent":
                    for _, command in t.commands:
                        if command.body.step == audit.step and command.body.kind == audit.kind:
                            r.resent.add(command.body.command_id)
        return r


def facts(run: Run) -> Facts:
    """``Facts.of(run)``, a late compensation counted once though a retry sent its first attempt again."""
    f = Facts.of(run)
    seen: set[tuple[str, str]] = set()
    late = []
    for index, step, label in f.late:
        if (step, label) not in seen:
            seen.add((step, label))
            late.append((index, step, label))
    f.late = late
    return f


def own_compensations(f: Facts) -> dict[str, int]:
    """Step -> log index of the first dispatch of its own compensation (not a late success's)."""
    own: dict[str, int] = {}
    for index, _, body in f.commands:
        if body.kind == "compensate" and ":late-" not in body.command_id:
            own.setdefault(body.step, index)
    return own


def awaited(saga: SagaContext) -> set[str]:
    """The command ids ``saga`` awaits: its steps' and its late compensations'."""
    ids = {
        rt.command_id
        for rt in saga.steps.values()
        if rt.command_id is not None and rt.status in (StepStatus.RUNNING, StepStatus.COMPENSATING)
    }
    return ids | {c.command_id for c in saga.late_runs.values() if c.command_id is not None}


# ====================================================================== the properties


def check_never_stuck_and_a_failed_saga_recovers(run: Run) -> None:
    """Where every command is answered (or its timeout fires) and every timer fires, no saga is left
    non-final once nothing is left to happen, whatever the repairs; a failed one (final) is retried once
    its compensations succeed, and ends compensated or cancelled."""
    assert run.quiet, "the world never went quiet"
    for index, state, timers in run.quiet:
        assert not timers
        assert state.is_final, f"stuck {state.value} at event {index} with nothing in flight and no timer"
    retries = [e for e in run.log[run.quiet[0][0] :] if isinstance(e.event, RepairSaga)]
    for entry in retries:
        assert entry.transition.changed, f"a failed saga's retry refused: {entry.transition.rejected}"
    assert run.saga.state is not WorkflowState.FAILED, "still failed after healed retries"


def check_saga_agrees_with_its_steps(run: Run) -> None:
    f, r = facts(run), Repairs.of(run)
    saga, d = run.saga, run.definition
    assert saga.state.is_final and saga.current_step is None
    # Each time the saga entered a final state, only the compensations of late successes had timers
    # left. (Adapted: a repair can take a failed saga out of its final state, so this holds at every
    # entry into a final state, not only the first.)
    for index, timers in run.finals:
        assert all(":late-" in timer_id for timer_id in timers), f"timers left at final event {index}"
    assert saga.late_runs == {} and not saga.compensation_queue
    assert saga.step_results == {name: dict(ev.body.result or {}) for name, (_, ev) in f.counted.items()}
    # Adapted: a retry of a stuck step resends its awaited command: same id, so the same attempt.
    for name, sent in f.executes.items():
        attempts = list(dict.fromkeys(sent))
        assert attempts == list(range(1, len(attempts) + 1)) and len(attempts) <= max_attempts(run, name)
    ran = set(f.executed())
    if saga.state is WorkflowState.COMPLETED:
        assert set(f.counted) == {s.name for s in d.get_steps()} - skipped(run)
        assert not f.compensations and saga.error is None and not r.cancelled
        assert all(saga.step(name).status is StepStatus.SUCCEEDED for name in f.counted)
        return
    assert saga.state in ROLLED_BACK, saga.state
    assert saga.error
    # Adapted: a force_cancel ends the saga cancelled as a cancel does.
    assert (saga.state is WorkflowState.CANCELLED) == r.cancelled
    for name in ran:
        step = d.step(name)
        assert step is not None
        status = saga.step(name).status
        if step.compensation is not None:
            assert status is StepStatus.COMPENSATED, f"{name} ran and is {status.value}"
        else:
            assert status in (StepStatus.SUCCEEDED, StepStatus.FAILED), f"{name} is {status.value}"


def check_compensations_once_each_in_design_order(run: Run) -> None:
    f, r = facts(run), Repairs.of(run)
    expected = expected_compensations(run, f)
    # A step's own compensation is done once: it succeeded, or (adapted) an operator's skip counted it
    # done by hand. Either way once, in design order, and never sent again after.
    done: list[tuple[int, str]] = []
    for entry in run.log:
        for audit in audit_actions(entry.transition):
            if audit.action == "compensation_succeeded":
                assert isinstance(entry.event, StepResult)
                assert audit.step is not None
                done.append((entry.index, audit.step))
    done += [(index, step) for step, index in r.skipped.items()]
    done.sort()
    names = [step for _, step in done]
    assert len(names) == len(set(names)), f"a compensation done twice: {names}"
    assert names == expected[: len(names)], (names, expected)
    if run.saga.state in ROLLED_BACK:
        assert names == expected
    finished = {step: index for index, step in done}
    for index, _, body in f.commands:
        if body.kind == "compensate" and ":late-" not in body.command_id and body.command_id not in r.resent:
            assert finished.get(body.step, len(run.log)) > index, f"{body.step} compensated again"
    # Own compensations: attempts 1, 2, ... of the expected steps only, one step at a time. Adapted: a
    # retry of a failed saga sends its failed compensation once more, beyond the retry policy.
    assert set(f.compensations) <= set(expected)
    for name, sent in f.compensations.items():
        attempts = list(dict.fromkeys(sent))  # adapted: a retry resends an awaited attempt
        assert attempts == list(range(1, len(attempts) + 1))
        assert len(attempts) <= max_attempts(run, name) + r.retries
    first_dispatch = [
        b.step for _, _, b in f.commands if b.kind == "compensate" and ":late-" not in b.command_id
    ]
    assert list(dict.fromkeys(first_dispatch)) == expected[: len(set(first_dispatch))]


def check_late_successes_are_undone_once(run: Run) -> None:
    """A success the saga gave up on is undone once: by its step's own compensation when that is still
    to come, else by an extra compensation; never both (a repair that resumes a stopped rollback must not
    compensate a step whose late success was already undone)."""
    f, r = facts(run), Repairs.of(run)
    d = run.definition
    never = len(run.log)
    own = own_compensations(f)
    extra: set[str] = set()
    for index, step, label in f.late:
        event = run.log[index].event
        assert isinstance(event, StepResult) and event.body.step == step and event.body.kind == "execute"
        assert event.body.status == "succeeded" and label == f"late-{event.body.attempt}"
        counted = f.counted.get(step)
        assert counted is None or counted[1].body.command_id != event.body.command_id
        before = run.log[index].before
        assert before is not None
        if before.step(step).status not in (StepStatus.RUNNING, StepStatus.RETRY_WAIT):
            # (Not checked for a step still awaited in a rollback: there the engine undoes an earlier
            # attempt's success at once and the step's own compensation follows, as it did before repairs.)
            assert own.get(step, never) < index or step not in own, (
                f"{step}'s late success undone at {index}, and its own compensation sent after it"
            )
        assert counted is None or counted[0] > index or own.get(step, never) < index
        extra.add(event.body.command_id)
    for cid, (index, event) in f.first_success.items():
        step = event.body.step
        if d.step(step).compensation is not None and own.get(step, never) < index:  # type: ignore[union-attr]
            assert cid in extra, f"{cid} succeeded after {step} was compensated and was left behind"
    # Adapted: a retry of a failed saga sends a failed late compensation once more.
    for label, sent in f.late_attempts.items():
        step = label.split(":", 1)[0]
        attempts = list(dict.fromkeys(sent))  # a retry resends an awaited attempt
        assert attempts == list(range(1, len(attempts) + 1))
        assert len(attempts) <= max_attempts(run, step) + r.retries


def check_repairs_are_decided_once_and_refused_cleanly(run: Run) -> None:
    applied: dict[str, int] = {}
    sent: set[str] = set()
    for entry in run.log:
        event, t, before = entry.event, entry.transition, entry.before
        new = [cmd.body for _, cmd in t.commands if cmd.body.command_id not in sent]
        again = [cmd.body for _, cmd in t.commands if cmd.body.command_id in sent]
        if again:
            # Only a retry sends a command again, and only one the saga awaits, unchanged.
            assert isinstance(event, RepairSaga) and event.body.action == "retry" and before is not None
            assert {body.command_id for body in again} <= awaited(before)
        assert len({body.command_id for body in new}) == len(new)
        sent |= {body.command_id for body in new}
        if not isinstance(event, RepairSaga):
            continue
        assert before is not None
        body = event.body
        # A repair sent again is applied once, while the saga remembers it (its last REPAIRS_KEPT).
        if event.event_id in applied and len(applied) - applied[event.event_id] <= REPAIRS_KEPT:
            assert not t.changed and t.note == "duplicate repair"
            continue
        why = refusal(before, body, run.definition)
        if why is not None or (body.run_id is not None and body.run_id != before.run_id):
            assert why is not None and not t.changed and t.rejected == why
            continue
        assert t.changed and t.rejected is None
        assert actions(t)[0] in REPAIR_ACTIONS
        assert body.action != "force_cancel" or not before.state.is_final
        assert body.action != "skip_compensation" or (body.step and body.reason)
        applied[event.event_id] = len(applied)
    timer_ids = [timer.timer_id for entry in run.log for timer in entry.transition.timers]
    assert len(timer_ids) == len(set(timer_ids)), "a timer id was reused"
    versions = [e.transition.saga.version for e in run.log if e.transition.changed and e.transition.saga]
    assert versions == list(range(1, len(versions) + 1))
    for _, cmd_topic, cmd in ((e.index, *c) for e in run.log for c in e.transition.commands):
        assert cmd.body.command_id.startswith(f"{TX}:{run.saga.run_id}:{cmd.body.step}:{cmd.body.kind}:")
        assert cmd_topic.startswith("saga.commands." if cmd.body.kind == "execute" else "saga.compensations.")


def check_a_final_saga_changes_only_by_late_compensations_or_repairs(run: Run) -> None:
    """After the saga's end only the compensations of late successes go on, and the only change of state
    is to failed when one fails for good. Adapted: an operator's retry or skip takes a failed saga back
    to compensating (and its compensations run), or ends it as its rollback would have."""
    for entry in run.log:
        before, t = entry.before, entry.transition
        if before is None or not before.state.is_final or not t.changed:
            continue
        assert t.saga is not None
        if isinstance(entry.event, RepairSaga):
            if entry.event.body.action != "force_cancel" and before.state is WorkflowState.FAILED:
                continue
            assert t.saga.state is before.state or t.saga.state is WorkflowState.FAILED
            continue
        done = actions(t)
        assert set(done) <= LATE_ACTIONS | {"saga_failed"}, done
        assert t.saga.state is before.state or (
            t.saga.state is WorkflowState.FAILED and "late_compensation_failed" in done
        )
        assert all(":late-" in cmd.body.command_id for _, cmd in t.commands)


CHECKS = (
    check_never_stuck_and_a_failed_saga_recovers,
    check_saga_agrees_with_its_steps,
    check_compensations_once_each_in_design_order,
    check_late_successes_are_undone_once,
    check_repairs_are_decided_once_and_refused_cleanly,
    check_a_final_saga_changes_only_by_late_compensations_or_repairs,
)


def describe(run: Run) -> None:
    """Statistics for ``pytest --hypothesis-show-statistics``: which repairs the runs made."""
    for entry in run.log:
        if isinstance(entry.event, RepairSaga):
            body = entry.event.body
            before = entry.before.state.value if entry.before else "-"
            outcome = "applied" if entry.transition.changed else entry.transition.note
            event(f"{body.action} on {before}: {outcome}")
    event(f"ends {run.quiet[0][1].value}, then {run.saga.state.value}")


def _check(run: Run) -> None:
    describe(run)
    with explained(run):
        for check in CHECKS:
            check(run)


@SETTINGS
@given(shape=shapes(), seed=st.integers(0, 2**32 - 1))
def test_repairs_keep_the_saga_invariants(shape: Shape, seed: int) -> None:
    _check(simulate(shape, random.Random(seed), repairs=True))


@settings(SETTINGS, max_examples=400)
@given(shape=shapes(timeouts=True), seed=st.integers(0, 2**32 - 1))
def test_repairs_keep_the_saga_invariants_with_slow_workers(shape: Shape, seed: int) -> None:
    """The same with slow workers: timeouts, late answers and late compensations, so repairs meet
    sagas rolling back, failed by a late compensation and stuck waiting."""
    _check(simulate(shape, random.Random(seed), slow=True, repairs=True))
