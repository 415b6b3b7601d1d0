"""The account of writes a full state store refused (orchestrator_kafka.refusals), on a fake clock:
backoff, one log line per interval, the metric, and the readiness reason."""

from __future__ import annotations

import logging

import pytest

from orchestrator_kafka.errors import StoreFullError
from orchestrator_kafka.refusals import WriteRefusals

FULL = StoreFullError("Redis state store: apply failed: OutOfMemoryError: command not allowed")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def account(clock: Clock, counted: list[int] | None = None) -> WriteRefusals:
    tally = counted if counted is not None else []
    return WriteRefusals(
        logging.getLogger("test.refusals"),
        clock=clock,
        counted=lambda: tally.append(1),
        interval=30.0,
        first_delay=0.1,
        max_delay=5.0,
    )


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "test.refusals"]


def test_the_backoff_doubles_up_to_the_cap_and_starts_over_once_a_write_is_accepted(clock: Clock) -> None:
    refusals = account(clock)
    assert refusals.delay == 0.0
    delays = []
    for _ in range(9):
        delays.append(refusals.refused(FULL))
        clock.now += delays[-1]
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]
    refusals.accepted()
    assert refusals.delay == 0.0
    assert refusals.refused(FULL) == 0.1


def test_it_says_so_once_per_interval_and_once_when_it_is_over(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    counted: list[int] = []
    refusals = account(clock, counted)
    caplog.set_level(logging.INFO, logger="test.refusals")
    for _ in range(20):  # 20 tries over 40 s
        refusals.refused(FULL)
        clock.now += 2.0
    said = lines(caplog)
    assert len(said) == 2, said
    assert said[0].startswith("the state store refuses writes (") and "command not allowed" in said[0]
    assert said[1].startswith("the state store still refuses writes: 15 refused in the last 30s")
    assert len(counted) == 20  # the metric counts every one
    refusals.accepted()
    said = lines(caplog)
    assert len(said) == 3 and said[2].startswith("the state store accepts writes again after 40.0s")
    refusals.accepted()  # already over: nothing more to say
    assert len(lines(caplog)) == 3


def test_a_streak_right_after_another_is_not_announced_again_within_the_interval(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    refusals = account(clock)
    caplog.set_level(logging.INFO, logger="test.refusals")
    refusals.refused(FULL)
    clock.now += 1.0
    refusals.accepted()
    for _ in range(5):  # Redis at the edge: refused, accepted, refused...
        clock.now += 1.0
        refusals.refused(FULL)
        clock.now += 1.0
        refusals.accepted()
    assert len(lines(caplog)) == 2  # the first refusal and its end
    clock.now += 30.0
    refusals.refused(FULL)
    said = lines(caplog)
    assert len(said) == 3 and said[2].startswith("the state store refuses writes (")


def test_the_reason_lasts_while_refusals_do(clock: Clock) -> None:
    refusals = account(clock)
    assert refusals.reason() is None
    refusals.refused(FULL)
    clock.now += 12.0
    refusals.refused(FULL)
    reason = refusals.reason()
    assert reason is not None
    assert reason.startswith("the state store has refused writes for 12s") and "command not allowed" in reason
    refusals.accepted()
    assert refusals.reason() is None


def test_a_refusal_nobody_retries_stops_making_it_unready_after_the_interval(clock: Clock) -> None:
    refusals = account(clock)
    refusals.refused(FULL)  # say, a request whose caller got the error, and nothing else writes
    clock.now += 30.0
    assert refusals.reason() is not None
    clock.now += 0.1
    assert refusals.reason() is None
