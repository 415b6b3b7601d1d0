"""Reading dead letters back and planning a redrive (orchestrator_kafka.redrive): pure, no bus."""

from __future__ import annotations

import pytest

from orchestrator_kafka.dead_letters import dead_letter
from orchestrator_kafka.errors import ValidationError
from orchestrator_kafka.redrive import letters_of, parse_position, plan, select
from orchestrator_kafka.values import InboundMessage, OutboxMessage

DLQ = "p.dlq"


def _letter(offset: int, key: str, reason: str, value: bytes = b"{}", partition: int = 0) -> InboundMessage:
    source = InboundMessage("p.start", 3, 40 + offset, key.encode(), value, (("trace", b"t1"),))
    out = dead_letter(source, DLQ, reason, "why")
    return InboundMessage(DLQ, partition, offset, out.key.encode(), out.value, out.headers)


def _as_records(messages: list[tuple[int, OutboxMessage]]) -> list[InboundMessage]:
    return [InboundMessage(DLQ, 0, offset, m.key.encode(), m.value, m.headers) for offset, m in messages]


def test_letters_keep_the_original_message_and_say_where_it_came_from() -> None:
    (letter,) = letters_of([_letter(0, "tx-1", "unknown_workflow", b'{"a": 1}')])
    assert letter.position == "0:0" and letter.key == "tx-1" and letter.reason == "unknown_workflow"
    assert (letter.source_topic, letter.source_partition, letter.source_offset) == ("p.start", 3, 40)
    assert letter.value == b'{"a": 1}' and letter.headers == (("trace", b"t1"),)
    assert letter.redriven_by is None and letter.came_from is None and not letter.truncated


def test_a_plan_sends_copies_then_markers_and_the_markers_mark_the_letters() -> None:
    records = [_letter(0, "a", "r1"), _letter(1, "b", "r2")]
    copies, markers, report = plan(letters_of(records), DLQ, "req")
    assert [(c.topic, c.key, c.value) for c in copies] == [("p.start", "a", b"{}"), ("p.start", "b", b"{}")]
    assert dict(copies[0].headers) == {"trace": b"t1", "dlq.redrive.from": b"0:0", "dlq.redrive.id": b"req"}
    assert [m.topic for m in markers] == [DLQ, DLQ] and all(m.value == b"" for m in markers)
    assert [letter.redriven_by for letter in report.redriven] == ["req", "req"] and not report.refused
    after = letters_of(records + _as_records([(2, markers[0])]))
    assert [(letter.key, letter.redriven_by) for letter in after] == [("a", "req"), ("b", None)]
    _, _, again = plan(after, DLQ, "req2")
    assert [letter.key for letter in again.redriven] == ["b"]
    assert [(letter.key, why) for letter, why in again.refused] == [
        ("a", "sent back already, by redrive req")
    ]


def test_a_letter_cut_to_fit_or_without_a_source_is_refused() -> None:
    big = _letter(0, "big", "oversized", b"x" * 1_100_000)
    (cut,) = letters_of([big])
    assert cut.truncated
    bare = InboundMessage(DLQ, 0, 1, b"k", b"v", (("dlq.reason", b"r"),))
    copies, markers, report = plan(letters_of([big, bare]), DLQ, "req")
    assert copies == [] and markers == [] and report.redriven == []
    reasons = [why for _, why in report.refused]
    assert reasons[0].startswith("its value was cut to fit") and "p.start[3]@40" in reasons[0]
    assert reasons[1] == "it does not say which topic it came from"


def test_select_needs_a_criterion_and_matches_all_that_are_given() -> None:
    letters = letters_of([_letter(0, "a", "r1"), _letter(1, "b", "r1"), _letter(2, "a", "r2", partition=1)])
    with pytest.raises(ValidationError, match="choose the dead letters"):
        select(letters)
    assert [x.position for x in select(letters, reason="r1")] == ["0:0", "0:1"]
    assert [x.position for x in select(letters, transaction_id="a")] == ["0:0", "1:2"]
    assert [x.position for x in select(letters, transaction_id="a", reason="r2")] == ["1:2"]
    assert [x.position for x in select(letters, positions=[" 0:01", "1:2"])] == ["0:1", "1:2"]


@pytest.mark.parametrize("text", ["", "3", "a:1", "1:-2", "1:2:3", ":4"])
def test_a_malformed_position_is_a_validation_error_naming_it(text: str) -> None:
    with pytest.raises(ValidationError, match="<partition>:<offset>"):
        parse_position(text)
