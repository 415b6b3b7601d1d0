"""The watermark per partition: what a per-message subscription commits while messages finish out of order,
and the offsets done above it that travel in the commit's metadata."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator_kafka.backends.watermarks import Position, Watermarks

P = ("t", 0)


def test_the_mark_is_the_first_offset_not_done_and_what_is_done_above_it_goes_along() -> None:
    marks: Watermarks[tuple[str, int]] = Watermarks()
    assert marks.mark(P) is None and marks.ready() == {}
    for offset in (3, 4, 5, 7):  # a gap (a compacted or transactional topic) is fine
        marks.take(P, offset)
    assert marks.mark(P) == 3 and marks.unfinished(P) == 4
    assert marks.ready() == {}  # nothing done: nothing to commit
    assert not marks.done(P, 5)  # behind an unfinished one: the mark stays...
    assert marks.mark(P) == 3 and marks.ready() == {P: Position(3, (5,))}  # ...5 is committed as done
    assert marks.done(P, 3)
    assert marks.ready() == {P: Position(4, (5,))}
    assert marks.done(P, 4)  # 5 was done already: the mark jumps past it, to 7
    assert marks.mark(P) == 7 and marks.unfinished(P) == 1
    assert marks.done(P, 7)
    assert marks.mark(P) == 8 and marks.unfinished(P) == 0
    assert marks.ready() == {P: Position(8)}
    assert marks.ready() == {}


def test_partitions_are_independent_and_forgotten_on_revocation() -> None:
    marks: Watermarks[tuple[str, int]] = Watermarks()
    q = ("t", 1)
    marks.take(P, 0)
    marks.take(q, 10)
    marks.done(q, 10)
    assert marks.ready() == {q: Position(11)}
    marks.forget([q])
    assert marks.mark(q) is None and marks.partitions() == [P]
    assert not marks.done(q, 10)  # a late finish of a forgotten partition changes nothing
    marks.take(q, 5)  # owned again, from the committed offset: taken afresh
    assert marks.mark(q) == 5


def test_offsets_must_be_taken_in_order_and_strays_are_ignored() -> None:
    marks: Watermarks[tuple[str, int]] = Watermarks()
    marks.take(P, 5)
    with pytest.raises(ValueError, match="taken after"):
        marks.take(P, 5)
    assert not marks.done(P, 4) and not marks.done(P, 6)
    assert marks.done(P, 5) and not marks.done(P, 5)
    assert marks.mark(P) == 6


def test_the_metadata_round_trips_as_ranges_and_foreign_metadata_means_nothing_done() -> None:
    position = Position(100, (101, 102, 103, 105, 110, 111))
    assert position.encode() == "done1:1-3,5,10-11"
    assert Position.decode(100, position.encode()) == position
    assert Position(7).encode() == "" and Position.decode(7, "") == Position(7)
    for foreign in ("some other client's note", "done1:x", "done1:0", "done1:5-2", None):
        assert Position.decode(7, foreign) == Position(7)
    # Too many ranges for the broker's metadata limit: left out, so those are delivered again.
    scattered = Position(0, tuple(range(1, 20_000, 2)))
    assert scattered.encode() == ""


@given(st.lists(st.integers(min_value=1, max_value=3), min_size=1, max_size=40), st.randoms())
def test_the_mark_never_passes_an_unfinished_offset(gaps: list[int], rnd: random.Random) -> None:
    marks: Watermarks[tuple[str, int]] = Watermarks()
    offsets, offset = [], 0
    for gap in gaps:
        offset += gap
        offsets.append(offset)
        marks.take(P, offset)
    order = list(offsets)
    rnd.shuffle(order)
    committed = -1
    unfinished = set(offsets)
    for o in order:
        marks.done(P, o)
        unfinished.discard(o)
        expected = min(unfinished) if unfinished else offsets[-1] + 1
        assert marks.mark(P) == expected
        position = marks.ready()[P]  # something was done: always reported
        assert position.offset >= committed  # never backwards
        committed = position.offset
        # What it says is done is exactly what is done above the mark: a new owner skips only those.
        assert set(position.done) == {d for d in offsets if d > expected and d not in unfinished}
        assert Position.decode(position.offset, position.encode()) == position
        assert marks.unfinished(P) == len(unfinished)
    assert committed == offsets[-1] + 1
