"""What a Redis store knows of each partition's earliest timer (backends/redis/due.py): when an idle
orchestrator asks a partition for due timers again."""

from __future__ import annotations

from orchestrator_kafka.backends.redis.due import DueTimes
from orchestrator_kafka.values import Timer


def timer(due_at: float) -> Timer:
    return Timer("t", "tx", due_at, "retry", "s", "execute", 2)


def test_a_partition_never_asked_is_asked() -> None:
    assert DueTimes(1.0).to_ask(0, 100.0)


def test_a_partition_with_nothing_due_is_asked_again_after_the_recheck() -> None:
    due = DueTimes(1.0)
    due.asking(0)
    due.answered(0, None, 100.0)
    assert not due.to_ask(0, 100.5)
    assert due.to_ask(0, 101.0)


def test_a_partition_is_asked_once_its_earliest_timer_is_due() -> None:
    due = DueTimes(10.0)
    due.asking(0)
    due.answered(0, 103.0, 100.0)
    assert not due.to_ask(0, 102.9)
    assert due.to_ask(0, 103.0)


def test_a_timer_written_lowers_what_is_known_even_while_a_claim_is_out() -> None:
    due = DueTimes(10.0)
    due.asking(0)
    due.answered(0, None, 100.0)
    due.wrote(0, [timer(100.2)])
    assert due.to_ask(0, 100.2) and not due.to_ask(0, 100.1)
    due.asking(0)
    due.wrote(0, [timer(100.3), timer(100.25)])  # written while the claim is out: maybe not in it
    due.wrote(1, [timer(100.21)])  # another partition's
    due.answered(0, None, 100.2)  # the claim took 100.2's timer and saw nothing else
    assert not due.to_ask(0, 100.24) and due.to_ask(0, 100.25)


def test_a_clock_gone_back_asks_again() -> None:
    due = DueTimes(1.0)
    due.asking(0)
    due.answered(0, None, 100.0)
    assert due.to_ask(0, 99.0)
