"""The wire contract: one pydantic model per message, the source of ``schemas/``, and beside them the
fast builders of the messages the hot path writes.

Every message is a JSON envelope with ``schema_version``, ``event_id``, ``event_type``,
``transaction_id``, ``workflow_id``, ``occurred_at`` and a typed ``body``. Models are frozen and refuse
unknown fields, so a typo in a hand-written message is an error, not a silent default.

The engine and the workers do not build models on their hot path: :func:`command_payload`,
:func:`transition_payload` (of :func:`audit_action`) and :func:`step_result_bytes` write the same fields
as plain dicts or bytes, at a fraction of the cost. They live here, next to the models whose JSON they
must equal field for field (``tests/unit/test_builders.py`` holds them to it).
"""

from __future__ import annotations

import hashlib
import random
import time
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from .constants import SCHEMA_VERSION

Identifier = Annotated[str, Field(min_length=1, max_length=200)]
# "<transaction id>:<run id>:<step>:<execute|compensate>:<attempt or late-n.k>": two 200-character ids
# and the rest.
CommandId = Annotated[str, Field(min_length=1, max_length=512)]
StepKind = Literal["execute", "compensate"]
_NAMESPACE_BYTES = uuid.UUID("6f1c2b1e-0a53-4d8e-9a0e-5b7f4c1d2e3f").bytes
# The longest error type and message a result carries; a worker cuts longer ones to fit.
ERROR_TYPE_MAX = 500
ERROR_MESSAGE_MAX = 10_000


def command_id(transaction_id: str, step: str, kind: StepKind, attempt: int | str, run_id: str = "") -> str:
    """The id of a command: unique per saga run, step, kind and attempt (``attempt`` is a number, or
    ``late-<n>.<k>`` for attempt k of the compensation of a late success of attempt n).

    ``run_id`` is the saga's run (:func:`run_id_of`): with it, a new saga under a reused transaction id
    never sends a command id an earlier saga sent, so no worker answers it from its dedupe window. A saga
    stored before runs existed has none, and keeps the ids its commands in flight were sent with.
    """
    if run_id:
        return f"{transaction_id}:{run_id}:{step}:{kind}:{attempt}"
    return f"{transaction_id}:{step}:{kind}:{attempt}"


def run_id_of(start_event_id: str, started_at: datetime) -> str:
    """The run id of a saga started by the event ``start_event_id`` at ``started_at``: unique per start,
    even when a client repeats a start's event id after the saga was deleted. Sixteen hex digits keep
    command ids short."""
    return hashlib.sha1(f"{start_event_id}@{started_at.isoformat()}".encode()).hexdigest()[:16]


def of_run(cid: str, transaction_id: str, run_id: str) -> bool:
    """Whether command ``cid`` was sent by run ``run_id`` of saga ``transaction_id``; any command is, for
    a saga without a run id (stored before runs existed). Matched as a prefix, never parsed: ids may
    hold colons."""
    return not run_id or cid.startswith(f"{transaction_id}:{run_id}:")


def derived_event_id(name: str) -> str:
    """A deterministic name-based (version 5) UUID of ``name``, so that the same transition always
    makes the same message. Built by hand: ``uuid.uuid5`` costs several times more on the hot path."""
    d = hashlib.sha1(_NAMESPACE_BYTES + name.encode()).hexdigest()
    return f"{d[:8]}-{d[8:12]}-5{d[13:16]}-{UUID_VARIANT_DIGIT[d[16]]}{d[17:20]}-{d[20:32]}"


# The RFC 4122 variant's first hex digit for each value of the digest's: 10xx in binary.
UUID_VARIANT_DIGIT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Envelope(_Frozen):
    """The fields every message carries."""

    schema_version: str = Field(
        default=SCHEMA_VERSION,
        pattern=r"^\d+\.\d+$",
        description="major.minor of the wire contract; a major newer than the reader's is dead-lettered.",
    )
    event_id: Identifier = Field(
        description="Unique per message; the orchestrator deduplicates on it, so a re-sent message keeps it."
    )
    transaction_id: Identifier = Field(description="The saga's id; also the Kafka message key.")
    workflow_id: Identifier = Field(description="The workflow the saga runs.")
    occurred_at: datetime = Field(description="When the message was made: an RFC 3339 date-time with offset.")


class StartBody(_Frozen):
    context: dict[str, Any] = Field(default_factory=dict, description="The saga's initial data.")


class StartSaga(Envelope):
    """A request to start a saga (topic ``<prefix>.start``). Starting a known id again starts nothing."""

    event_type: Literal["saga.start"] = "saga.start"
    body: StartBody = Field(default_factory=StartBody)


class CancelBody(_Frozen):
    reason: str | None = Field(default=None, description="Why, for the audit record.")


class CancelSaga(Envelope):
    """A request to cancel a pending or running saga (topic ``<prefix>.start``)."""

    event_type: Literal["saga.cancel"] = "saga.cancel"
    body: CancelBody = Field(default_factory=CancelBody)


RepairAction = Literal["retry", "skip_compensation", "force_cancel"]


class RepairBody(_Frozen):
    action: RepairAction = Field(
        description=(
            "retry: re-run a failed saga's failed compensations and go on with its rollback, or send a"
            " stuck step's awaited command again; skip_compensation: count one step's failed or stuck"
            " compensation as done by hand; force_cancel: stop waiting for the steps in flight of a"
            " saga stuck compensating, compensate them, and end it cancelled."
        )
    )
    run_id: str | None = Field(
        default=None,
        max_length=200,
        description="The run repaired (a saga's status shows it); another run of the id is not repaired.",
    )
    step: Identifier | None = Field(
        default=None, description="The step: required by skip_compensation; retry's only target if given."
    )
    reason: str | None = Field(
        default=None, max_length=1000, description="Why, for the audit record; required by skip_compensation."
    )


class RepairSaga(Envelope):
    """An operator's repair of a saga (topic ``<prefix>.start``), decided by the orchestrator like any
    event: applied and audited, or refused (logged) where it does not apply."""

    event_type: Literal["saga.repair"] = "saga.repair"
    body: RepairBody


class CommandBody(_Frozen):
    command_id: CommandId = Field(description="Unique per command; workers deduplicate on it.")
    step: Identifier = Field(description="The step's name in the workflow.")
    worker_name: Identifier = Field(description="The handler to run: the <worker> of the topic it came on.")
    kind: StepKind = Field(description="execute runs the step; compensate undoes it.")
    attempt: int = Field(ge=1, description="1, then one more per retry; a compensation counts its own.")
    data: dict[str, Any] = Field(default_factory=dict, description="The saga's data at dispatch.")
    timeout: float | None = Field(
        default=None,
        gt=0,
        description="Seconds until the orchestrator counts the attempt failed; null for no limit.",
    )


class StepCommand(Envelope):
    """Orchestrator to worker: run a step (``<prefix>.commands.<worker>``) or its compensation
    (``<prefix>.compensations.<worker>``)."""

    event_type: Literal["step.command"] = "step.command"
    body: CommandBody


class ErrorInfo(_Frozen):
    """Why an attempt failed."""

    type: str = Field(
        max_length=ERROR_TYPE_MAX, description="The kind of error, e.g. an exception's class name."
    )
    message: str = Field(max_length=ERROR_MESSAGE_MAX)
    retryable: bool = Field(
        default=True, description="false fails the step at once; true lets the retry policy try again."
    )


class ResultBody(_Frozen):
    command_id: CommandId = Field(description="The command_id of the command answered.")
    step: Identifier = Field(description="The command's step.")
    kind: StepKind = Field(description="The command's kind.")
    attempt: int = Field(ge=1, description="The command's attempt.")
    status: Literal["succeeded", "failed"]
    result: dict[str, Any] | None = Field(
        default=None, description="On success, the step's output: merged into the saga's data."
    )
    error: ErrorInfo | None = Field(default=None, description="On failure, why; null on success.")

    def failure(self) -> tuple[str, bool]:
        """A failed result's error as a saga records it (``type: message``), and whether it may be
        retried; a failure that says nothing may be."""
        error = self.error
        if error is None:
            return "failed without an error", True
        return f"{error.type}: {error.message}", error.retryable


class StepResult(Envelope):
    """Worker to orchestrator: the outcome of one command (``<prefix>.results``)."""

    event_type: Literal["step.result"] = "step.result"
    body: ResultBody


# The one list of audit action names: the engine records them, telemetry and the CLI's rendering match
# them, and schemas/ lists them as the enum of an action's name.
class AuditActionName(StrEnum):
    """What one action of a saga transition did."""

    SAGA_CREATED = "saga_created"
    SAGA_STARTED = "saga_started"
    STEP_SKIPPED = "step_skipped"
    CONDITION_FAILED = "condition_failed"
    STEP_DISPATCHED = "step_dispatched"
    STEP_SUCCEEDED = "step_succeeded"
    STEP_FAILED = "step_failed"
    STEP_TIMED_OUT = "step_timed_out"
    RETRY_SCHEDULED = "retry_scheduled"
    CANCEL_REQUESTED = "cancel_requested"
    COMPENSATION_STARTED = "compensation_started"
    COMPENSATION_DISPATCHED = "compensation_dispatched"
    COMPENSATION_SUCCEEDED = "compensation_succeeded"
    COMPENSATION_FAILED_ATTEMPT = "compensation_failed_attempt"
    # The compensation of a success that came after the saga gave up on its attempt.
    LATE_SUCCESS_COMPENSATED = "late_success_compensated"
    LATE_COMPENSATION_DISPATCHED = "late_compensation_dispatched"
    LATE_COMPENSATION_SUCCEEDED = "late_compensation_succeeded"
    LATE_COMPENSATION_TIMED_OUT = "late_compensation_timed_out"
    LATE_COMPENSATION_FAILED_ATTEMPT = "late_compensation_failed_attempt"
    LATE_COMPENSATION_RETRY_SCHEDULED = "late_compensation_retry_scheduled"
    LATE_COMPENSATION_FAILED = "late_compensation_failed"
    SAGA_COMPLETED = "saga_completed"
    SAGA_COMPENSATED = "saga_compensated"
    SAGA_CANCELLED = "saga_cancelled"
    SAGA_FAILED = "saga_failed"
    # The saga's workflow version is not loaded by the orchestrator that handled its event: its events
    # are dead-lettered (unknown_version) until one that has the version takes the saga back.
    SAGA_PARKED = "saga_parked"
    SAGA_RESUMED = "saga_resumed"
    # An operator's repairs (saga.repair): what each did.
    RETRY_REQUESTED = "retry_requested"
    COMMAND_RESENT = "command_resent"
    COMPENSATION_SKIPPED = "compensation_skipped"
    FORCE_CANCEL_REQUESTED = "force_cancel_requested"


# The actions that schedule a retry, of a step or compensation or of a late success's compensation.
RETRY_ACTIONS = frozenset(
    {AuditActionName.RETRY_SCHEDULED, AuditActionName.LATE_COMPENSATION_RETRY_SCHEDULED}
)


class AuditAction(_Frozen):
    """One thing a transition did: a step dispatched, a result taken, a state entered."""

    action: AuditActionName = Field(description="What was done.")
    state: str = Field(description="The saga's state after this action.")
    step: str | None = None
    worker_name: str | None = Field(default=None, description="The worker a dispatched command went to.")
    kind: StepKind | None = None
    attempt: int | None = None
    error: str | None = None


class TransitionBody(_Frozen):
    from_state: str | None = Field(description="The saga's state before the transition; null when created.")
    to_state: str = Field(description="The saga's state after the transition.")
    version: int = Field(description="The saga's version after the transition.")
    actions: list[AuditAction]


class SagaEvent(Envelope):
    """Orchestrator to operators: the audit record of one saga transition (``<prefix>.events``):
    the state before and after, and every action the transition took, in order."""

    event_type: Literal["saga.transition"] = "saga.transition"
    body: TransitionBody


Message = StartSaga | CancelSaga | RepairSaga | StepCommand | StepResult | SagaEvent
MESSAGE_TYPES: dict[str, type[Envelope]] = {
    "saga.start": StartSaga,
    "saga.cancel": CancelSaga,
    "saga.repair": RepairSaga,
    "step.command": StepCommand,
    "step.result": StepResult,
    "saga.transition": SagaEvent,
}
MESSAGE_ADAPTER: TypeAdapter[Message] = TypeAdapter(Annotated[Message, Field(discriminator="event_type")])


# ---------------------------------------------------------------------------------- hot-path builders
# Each writes its model's fields in the model's order, as plain JSON values, so that orjson's bytes of it
# are the model's JSON byte for byte (a datetime given as such needs orjson.OPT_UTC_Z to end in "Z").


def command_payload(
    transaction_id: str,
    workflow_id: str,
    occurred_at: datetime,
    cid: str,
    step: str,
    worker_name: str,
    kind: StepKind,
    attempt: int,
    data: dict[str, Any],
    timeout: float | None,
) -> dict[str, Any]:
    """The fields of the :class:`StepCommand` ``cid``, holding ``data`` as given. Its event id is derived
    from ``cid``, so a command re-sent from an outbox keeps it."""
    return {
        "schema_version": SCHEMA_VERSION,
        "event_id": derived_event_id(cid),
        "transaction_id": transaction_id,
        "workflow_id": workflow_id,
        "occurred_at": occurred_at,
        "event_type": "step.command",
        "body": {
            "command_id": cid,
            "step": step,
            "worker_name": worker_name,
            "kind": kind,
            "attempt": attempt,
            "data": data,
            "timeout": timeout,
        },
    }


def audit_action(
    action: AuditActionName,
    state: str,
    step: str | None,
    worker_name: str | None,
    kind: StepKind | None,
    attempt: int | None,
    error: str | None,
) -> dict[str, Any]:
    """The fields of one :class:`AuditAction`, for :func:`transition_payload`."""
    return {
        "action": action,
        "state": state,
        "step": step,
        "worker_name": worker_name,
        "kind": kind,
        "attempt": attempt,
        "error": error,
    }


def transition_payload(
    transaction_id: str,
    workflow_id: str,
    occurred_at: datetime,
    from_state: str | None,
    to_state: str,
    version: int,
    actions: list[dict[str, Any]],
    run_id: str = "",
) -> dict[str, Any]:
    """The fields of the :class:`SagaEvent` of a saga's transition to ``version``, holding ``actions``
    (of :func:`audit_action`) as given. Its event id is derived from the saga's run and version, so a
    record re-sent from an outbox keeps it, and a later saga under the same transaction id gets others."""
    name = f"{transaction_id}:{run_id}:{version}:audit" if run_id else f"{transaction_id}:{version}:audit"
    return {
        "schema_version": SCHEMA_VERSION,
        "event_id": derived_event_id(name),
        "transaction_id": transaction_id,
        "workflow_id": workflow_id,
        "occurred_at": occurred_at,
        "event_type": "saga.transition",
        "body": {
            "from_state": from_state,
            "to_state": to_state,
            "version": version,
            "actions": actions,
        },
    }


def step_result_bytes(
    command: StepCommand,
    result: dict[str, Any] | orjson.Fragment | None,
    error: tuple[str, str, bool] | None = None,
) -> bytes:
    """The JSON of the :class:`StepResult` answering ``command``, with a fresh event id and the time now:
    succeeded with ``result``, or failed with ``error`` (type, message, retryable), cut to the lengths
    :class:`ErrorInfo` allows.

    Raises:
        TypeError: ``result`` is not JSON-serialisable.
    """
    body = command.body
    reply: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "event_id": random_event_id(),
        "transaction_id": command.transaction_id,
        "workflow_id": command.workflow_id,
        "occurred_at": utc_text(time.time_ns()),
        "event_type": "step.result",
        "body": {
            "command_id": body.command_id,
            "step": body.step,
            "kind": body.kind,
            "attempt": body.attempt,
            "status": "succeeded",
            "result": result,
            "error": None,
        },
    }
    if error is None:
        return orjson.dumps(reply)
    kind, message, retryable = error
    kind, message = kind[:ERROR_TYPE_MAX], message[:ERROR_MESSAGE_MAX]
    info: dict[str, Any] = {"type": kind, "message": message, "retryable": retryable}
    reply["body"]["status"] = "failed"
    reply["body"]["error"] = info
    try:
        return orjson.dumps(reply)
    except TypeError:  # text that is not UTF-8 (a lone surrogate), from an exception
        info["type"], info["message"] = _utf8(kind), _utf8(message)
        return orjson.dumps(reply)


def random_event_id() -> str:
    """A random (version 4) UUID. An id needs to be unique, not unguessable: ``random`` (reseeded in a
    forked child) costs a fraction of ``uuid.uuid4()``, which makes a system call for every id."""
    h = f"{random.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{UUID_VARIANT_DIGIT[h[16]]}{h[17:20]}-{h[20:]}"


_second: tuple[int, str] = (0, "1970-01-01T00:00:00")


def utc_text(ns: int) -> str:
    """``ns`` since the epoch as pydantic writes a UTC datetime: ``Z``, microseconds unless zero. The
    text of the second is kept: ``datetime.now(UTC).isoformat()`` costs about three times as much."""
    global _second
    second, micros = divmod(ns // 1000, 1_000_000)
    cached = _second
    if second != cached[0]:
        cached = _second = (second, datetime.fromtimestamp(second, UTC).isoformat()[:19])
    return f"{cached[1]}.{micros:06d}Z" if micros else f"{cached[1]}Z"


def _utf8(text: str) -> str:
    return text.encode("utf-8", "replace").decode("utf-8")
