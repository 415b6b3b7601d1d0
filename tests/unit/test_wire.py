"""The engine's fast encoding of outgoing messages is byte-for-byte the wire contract's, and the worker's
fast decoding (``codec.decode_command_first``) gives what ``codec.decode`` gives."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from orchestrator_kafka import WorkflowBuilder, codec
from orchestrator_kafka.constants import MAX_MESSAGE_BYTES
from orchestrator_kafka.engine import decide
from orchestrator_kafka.errors import DecodeError
from orchestrator_kafka.models import StartBody, StartSaga, StepCommand, command_id, command_payload


def test_outgoing_payloads_encode_exactly_as_their_models() -> None:
    workflow = (
        WorkflowBuilder("wf")
        .add_parallel_steps(
            [
                {"name": "a", "worker_name": "wa", "compensation": "ua", "timeout": 2.5},
                {"name": "b", "worker_name": "wb"},
            ]
        )
        .build()
    )
    now = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    start = StartSaga(
        event_id="e",
        transaction_id="tx",
        workflow_id="wf",
        occurred_at=now,
        body=StartBody(context={"k": [1, "é"]}),
    )
    t = decide(workflow, None, start, now)
    assert [o.payload["event_type"] for o in t.outgoing] == [
        "step.command",
        "step.command",
        "saga.transition",
    ]
    for outgoing in t.outgoing:
        model = outgoing.message()
        assert codec.decode(outgoing.encode()) == model
        assert outgoing.encode() == codec.encode(model)
    assert orjson.loads(t.outgoing[0].encode())["body"]["data"] == {"k": [1, "é"]}
    assert t.commands[0][1].body.timeout == 2.5 and t.audit is not None and t.audit.body.version == 1


def test_the_longest_ids_still_make_decodable_commands() -> None:
    # A 200-character transaction id and a 200-character step name give a 400-odd-character command id.
    step = "s" * 200
    workflow = WorkflowBuilder("wf").add_step(step, "w" * 200).build()
    now = datetime(2026, 1, 2, tzinfo=UTC)
    start = StartSaga(event_id="e", transaction_id="t" * 200, workflow_id="wf", occurred_at=now)
    [command, _audit] = decide(workflow, None, start, now).outgoing
    decoded = codec.decode(command.encode())
    assert decoded.event_type == "step.command" and len(decoded.body.command_id) > 400


def _command_json(**changes: object) -> bytes:
    payload = command_payload(
        "tx",
        "wf",
        datetime(2026, 1, 2, tzinfo=UTC),
        command_id("tx", "s", "execute", 1),
        "s",
        "w",
        "execute",
        1,
        {"k": "é"},
        None,
    )
    payload.update(changes)
    return orjson.dumps(payload, option=orjson.OPT_UTC_Z)


_START = orjson.dumps(
    StartSaga(
        event_id="e", transaction_id="tx", workflow_id="wf", occurred_at=datetime(2026, 1, 2, tzinfo=UTC)
    ).model_dump(mode="json")
)


@pytest.mark.parametrize(
    "value",
    [
        _command_json(),
        _command_json(schema_version="1.3"),  # an older minor version: decoded all the same
        _START,  # not a command: the worker dead-letters it, by its type
    ],
    ids=["command", "minor-version", "start"],
)
def test_decode_command_first_gives_what_decode_gives(value: bytes) -> None:
    decoded = codec.decode_command_first(value)
    assert decoded == codec.decode(value) and type(decoded) is type(codec.decode(value))
    if decoded.event_type == "step.command":
        assert isinstance(decoded, StepCommand) and decoded.body.data == {"k": "é"}


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, codec.NULL_VALUE),
        (b"{not json", codec.MALFORMED_JSON),
        (b"[1]", codec.NOT_AN_OBJECT),
        (_command_json(event_type="step.progress"), codec.UNKNOWN_EVENT_TYPE),
        (_command_json(schema_version="2.0"), codec.UNSUPPORTED_SCHEMA_VERSION),
        (_command_json(workflow_id=""), codec.INVALID_MESSAGE),
        (_command_json(padding="x" * MAX_MESSAGE_BYTES), codec.OVERSIZED),
    ],
    ids=["null", "malformed", "not-an-object", "unknown-type", "newer-major", "invalid", "oversized"],
)
def test_decode_command_first_refuses_what_decode_refuses(value: bytes | None, reason: str) -> None:
    with pytest.raises(DecodeError) as fast:
        codec.decode_command_first(value)
    with pytest.raises(DecodeError) as slow:
        codec.decode(value)
    assert fast.value.reason == slow.value.reason == reason
    assert fast.value.detail == slow.value.detail
