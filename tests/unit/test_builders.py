"""The hot path's message builders in ``models`` write exactly what their pydantic models write: for every
variant, the builder's JSON parsed is the model's ``model_dump(mode="json")``, and the model's own
encoding of it is the builder's bytes, byte for byte (key order included)."""

from __future__ import annotations

import re
import time
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, TypeVar

import orjson
import pydantic
import pytest

from orchestrator_kafka import codec
from orchestrator_kafka.models import (
    ERROR_MESSAGE_MAX,
    ERROR_TYPE_MAX,
    AuditActionName,
    CommandBody,
    SagaEvent,
    StepCommand,
    StepKind,
    StepResult,
    audit_action,
    command_id,
    command_payload,
    derived_event_id,
    random_event_id,
    step_result_bytes,
    transition_payload,
    utc_text,
)

AT = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
_NAMESPACE = uuid.UUID("6f1c2b1e-0a53-4d8e-9a0e-5b7f4c1d2e3f")


M = TypeVar("M", StepCommand, SagaEvent, StepResult)


def assert_is_the_models(model: type[M], value: bytes) -> M:
    """``value`` (a builder's bytes) is what ``model`` makes of it, both ways."""
    parsed = orjson.loads(value)
    message = model.model_validate(parsed)
    assert message.model_dump(mode="json") == parsed
    assert codec.encode(message) == value
    assert model.model_validate_json(value) == message
    return message


def encode(payload: dict[str, Any]) -> bytes:
    """A payload's bytes, as ``engine.Outgoing.encode`` writes them."""
    return orjson.dumps(payload, option=orjson.OPT_UTC_Z)


# ---------------------------------------------------------------------------------- step.command


@pytest.mark.parametrize("kind", ["execute", "compensate"])
@pytest.mark.parametrize("timeout", [None, 2.5, 30.0, 1e-3])
@pytest.mark.parametrize(
    "data", [{}, {"k": [1, "é", None, 2.5], "nested": {"a": {"b": [True, False]}}, "n": 10**15}]
)
def test_command_payload_is_the_step_commands(
    kind: StepKind, timeout: float | None, data: dict[str, Any]
) -> None:
    cid = command_id("tx-1", "reserve", kind, 3)
    payload = command_payload("tx-1", "wf", AT, cid, "reserve", "inventory", kind, 3, data, timeout)
    command = assert_is_the_models(StepCommand, encode(payload))
    assert command.event_id == derived_event_id(cid)
    assert command.body == CommandBody(
        command_id=cid,
        step="reserve",
        worker_name="inventory",
        kind=kind,
        attempt=3,
        data=data,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "when",
    [AT, AT.replace(microsecond=0), AT.astimezone(timezone(timedelta(hours=2)))],
    ids=["micros", "whole-second", "other-offset"],
)
def test_command_time_is_written_as_the_model_writes_it(when: datetime) -> None:
    payload = command_payload("tx", "wf", when, "tx:s:execute:1", "s", "w", "execute", 1, {}, None)
    command = assert_is_the_models(StepCommand, encode(payload))
    assert command.occurred_at == when


def test_command_of_the_longest_ids_and_a_late_compensation() -> None:
    tx, step = "t" * 200, "s" * 200
    for cid in (
        command_id(tx, step, "compensate", "late-2"),
        f"{command_id(tx, step, 'compensate', 'late-2')}.3",
    ):
        payload = command_payload(tx, "w" * 200, AT, cid, step, "u" * 200, "compensate", 3, {"x": 1}, None)
        assert_is_the_models(StepCommand, encode(payload))


def test_derived_event_id_is_the_name_based_uuid() -> None:
    for name in ("tx:s:execute:1", "tx:7:audit", "é" * 300, ""):
        assert derived_event_id(name) == str(uuid.uuid5(_NAMESPACE, name))


# ---------------------------------------------------------------------------------- saga.transition


def _every_action() -> list[dict[str, Any]]:
    """Each action name once, with the optional fields set in turn: none, a step, a dispatch (worker and
    kind), a retry (attempt and error)."""
    found: list[dict[str, Any]] = []
    for i, name in enumerate(AuditActionName):
        variant = i % 4
        found.append(
            audit_action(
                name,
                "running" if i % 2 else "compensating",
                "reserve" if variant else None,
                "inventory" if variant == 2 else None,
                ("execute" if i % 3 else "compensate") if variant >= 2 else None,
                i + 1 if variant == 3 else None,
                f"Boom: it broke {i} é" if variant == 3 else None,
            )
        )
    return found


@pytest.mark.parametrize(
    ("from_state", "to_state", "actions"),
    [
        (None, "running", _every_action()[:3]),
        ("running", "compensating", _every_action()),
        ("compensating", "failed", []),
    ],
)
def test_transition_payload_is_the_saga_events(
    from_state: str | None, to_state: str, actions: list[dict[str, Any]]
) -> None:
    payload = transition_payload("tx-1", "wf", AT, from_state, to_state, 7, actions)
    event = assert_is_the_models(SagaEvent, encode(payload))
    assert event.event_id == derived_event_id("tx-1:7:audit")
    assert [a.model_dump() for a in event.body.actions] == actions
    assert all(type(a.action) is AuditActionName for a in event.body.actions)


def test_an_audit_action_of_an_unknown_name_is_refused() -> None:
    payload = transition_payload(
        "tx",
        "wf",
        AT,
        "running",
        "running",
        2,
        [audit_action(AuditActionName.STEP_FAILED, "running", "s", None, None, None, None)],
    )
    payload["body"]["actions"][0]["action"] = "step_exploded"
    with pytest.raises(pydantic.ValidationError):
        SagaEvent.model_validate_json(encode(payload))


# ---------------------------------------------------------------------------------- step.result


def _command(kind: StepKind = "execute") -> StepCommand:
    cid = command_id("tx-9", "charge", kind, 2)
    return StepCommand.model_validate(
        command_payload("tx-9", "wf", AT, cid, "charge", "payments", kind, 2, {"a": 1}, 5.0)
    )


def _result(value: bytes) -> StepResult:
    result = assert_is_the_models(StepResult, value)
    assert str(uuid.UUID(result.event_id)) == result.event_id and uuid.UUID(result.event_id).version == 4
    assert orjson.loads(value)["occurred_at"].endswith("Z")
    assert abs(datetime.now(UTC) - result.occurred_at) < timedelta(seconds=30)
    return result


@pytest.mark.parametrize("kind", ["execute", "compensate"])
@pytest.mark.parametrize("outcome", [{}, {"ok": True, "n": [1, 2.5, None, "é"], "deep": {"a": {}}}])
def test_a_success_is_the_step_results(kind: StepKind, outcome: dict[str, Any]) -> None:
    command = _command(kind)
    result = _result(step_result_bytes(command, outcome))
    body = result.body
    assert (result.transaction_id, result.workflow_id) == (command.transaction_id, command.workflow_id)
    assert (body.command_id, body.step, body.kind, body.attempt) == (
        command.body.command_id,
        "charge",
        kind,
        2,
    )
    assert (body.status, body.result, body.error) == ("succeeded", outcome, None)


def test_a_success_of_an_encoded_fragment_is_the_step_results() -> None:
    result = _result(step_result_bytes(_command(), orjson.Fragment(b'{"x":[1,2]}')))
    assert result.body.result == {"x": [1, 2]}


def test_a_result_that_orjson_cannot_encode_raises_type_error() -> None:
    with pytest.raises(TypeError):
        step_result_bytes(_command(), {"s": {1, 2}})


@pytest.mark.parametrize("kind", ["execute", "compensate"])
@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (("KeyError", "'missing'", True), ("KeyError", "'missing'", True)),
        (("OutOfStock", "none left", False), ("OutOfStock", "none left", False)),
        (("", "", True), ("", "", True)),
        (("E" * 600, "x" * 20_000, True), ("E" * ERROR_TYPE_MAX, "x" * ERROR_MESSAGE_MAX, True)),
        (("Bad\udc80", "bad \udc80 text", False), ("Bad?", "bad ? text", False)),
    ],
    ids=["retryable", "non-retryable", "empty", "cut-to-length", "not-utf-8"],
)
def test_a_failure_is_the_step_results(
    kind: StepKind, error: tuple[str, str, bool], expected: tuple[str, str, bool]
) -> None:
    result = _result(step_result_bytes(_command(kind), None, error))
    body = result.body
    assert (body.status, body.result, body.kind) == ("failed", None, kind)
    assert body.error is not None
    assert (body.error.type, body.error.message, body.error.retryable) == expected
    assert body.failure() == (f"{expected[0]}: {expected[1]}", expected[2])


def test_random_event_ids_are_version_4_uuids() -> None:
    ids = {random_event_id() for _ in range(2000)}
    assert len(ids) == 2000
    for text in ids:
        assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", text)
        assert str(uuid.UUID(text)) == text


@pytest.mark.parametrize(
    "when",
    [
        datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        datetime(2026, 1, 2, 3, 4, 5, 1, tzinfo=UTC),
        datetime(2026, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
        datetime(1999, 3, 4, 0, 0, 0, 120_000, tzinfo=UTC),
    ],
)
def test_reply_time_is_written_as_pydantic_writes_it(when: datetime) -> None:
    ns = (int(when.timestamp()) * 1_000_000 + when.microsecond) * 1000 + 999
    text = utc_text(ns)
    assert text == utc_text(ns)  # the kept second answers the same
    assert orjson.dumps(text) == pydantic.TypeAdapter(datetime).dump_json(when)


def test_utc_text_follows_the_clock_across_seconds() -> None:
    now = time.time_ns()
    for ns in (now, now + 1_000_000_000, now - 5_000_000_000, now):
        expected = datetime.fromtimestamp(ns // 10**9, UTC).replace(microsecond=ns // 1000 % 10**6)
        assert datetime.fromisoformat(utc_text(ns)) == expected
