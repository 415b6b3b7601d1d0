"""Bytes to models and back: the only place wire bytes become messages.

``decode`` raises :class:`DecodeError` with one of the reason codes below, which the orchestrator and
the workers put on the dead-letter topic.
"""

from __future__ import annotations

from typing import Any

import orjson
import pydantic

from .constants import MAX_MESSAGE_BYTES, SCHEMA_MAJOR, SCHEMA_VERSION
from .errors import DecodeError
from .models import MESSAGE_ADAPTER, MESSAGE_TYPES, Message, StepCommand

NULL_VALUE = "null_value"
OVERSIZED = "oversized"
INVALID_UTF8 = "invalid_utf8"
MALFORMED_JSON = "malformed_json"
NOT_AN_OBJECT = "not_an_object"
UNKNOWN_EVENT_TYPE = "unknown_event_type"
UNSUPPORTED_SCHEMA_VERSION = "unsupported_schema_version"
INVALID_MESSAGE = "invalid_message"
UNKNOWN_TRANSACTION = "unknown_transaction"
UNEXPECTED_EVENT_TYPE = "unexpected_event_type"
# Why the orchestrator dead-letters an event it decoded but cannot apply.
UNKNOWN_WORKFLOW = "unknown_workflow"
OTHER_RUN = "other_run"
UNKNOWN_VERSION = "unknown_version"


def encode(message: Message) -> bytes:
    """The JSON bytes of ``message``."""
    # The serializer itself: model_dump_json's wrapper and the str round trip cost as much again.
    return message.__pydantic_serializer__.to_json(message)


def decode(value: bytes | None, *, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Parse and validate one message.

    Raises:
        DecodeError: with ``reason`` one of this module's reason codes.
    """
    if value is None:
        raise DecodeError(NULL_VALUE, "the message has no value")
    if len(value) > max_bytes:
        raise DecodeError(OVERSIZED, f"{len(value)} bytes is over the limit of {max_bytes}")
    try:
        # The common case in one native call; only a message that fails it is taken apart for a reason.
        message = MESSAGE_ADAPTER.validate_json(value)
    except pydantic.ValidationError:
        return _diagnose(value)
    major = message.schema_version.split(".", 1)[0]
    if int(major) > SCHEMA_MAJOR:
        raise DecodeError(
            UNSUPPORTED_SCHEMA_VERSION,
            f"schema_version {message.schema_version} is newer than {SCHEMA_MAJOR}.x",
        )
    return message


_STEP_COMMAND = StepCommand.__pydantic_validator__


def decode_command_first(value: bytes | None) -> Message:
    """:func:`decode` for a worker, whose messages are nearly all step commands: the value is validated
    straight as a :class:`StepCommand` first (the discriminated union costs more); anything else, or
    anything wrong, goes through :func:`decode`, so the result and the errors are the same.

    Raises:
        DecodeError: as :func:`decode`.
    """
    if value is not None and len(value) <= MAX_MESSAGE_BYTES:
        try:
            command: StepCommand = _STEP_COMMAND.validate_json(value)
        except pydantic.ValidationError:
            pass
        else:
            # Only the version this reader writes skips decode's check of the major version.
            if command.schema_version == SCHEMA_VERSION:
                return command
    return decode(value)


def _diagnose(value: bytes) -> Message:
    try:
        raw: Any = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError(INVALID_UTF8, str(exc)) from None
        raise DecodeError(MALFORMED_JSON, str(exc)) from None
    if not isinstance(raw, dict):
        raise DecodeError(NOT_AN_OBJECT, f"expected a JSON object, got {type(raw).__name__}")
    event_type = raw.get("event_type")
    if event_type not in MESSAGE_TYPES:
        raise DecodeError(UNKNOWN_EVENT_TYPE, f"unknown event_type {event_type!r}")
    version = raw.get("schema_version", "1.0")
    major = version.split(".", 1)[0] if isinstance(version, str) else ""
    if major.isdigit() and int(major) > SCHEMA_MAJOR:
        raise DecodeError(
            UNSUPPORTED_SCHEMA_VERSION, f"schema_version {version} is newer than {SCHEMA_MAJOR}.x"
        )
    try:
        return MESSAGE_ADAPTER.validate_python(raw)
    except pydantic.ValidationError as exc:
        detail = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()[:5]
        )
        raise DecodeError(INVALID_MESSAGE, detail) from None
