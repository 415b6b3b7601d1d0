"""The engine's fast encoding of outgoing messages is byte-for-byte the wire contract's."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson

from orchestrator_kafka import WorkflowBuilder, codec
from orchestrator_kafka.engine import decide
from orchestrator_kafka.models import StartBody, StartSaga


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
