"""The wire contract: one pydantic model per message, the source of ``schemas/``.

Every message is a JSON envelope with ``schema_version``, ``event_id``, ``event_type``,
``transaction_id``, ``workflow_id``, ``occurred_at`` and a typed ``body``. Models are frozen and refuse
unknown fields, so a typo in a hand-written message is an error, not a silent default.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from .constants import SCHEMA_VERSION

Identifier = Annotated[str, Field(min_length=1, max_length=200)]
# "<transaction id>:<step>:<execute|compensate>:<attempt, late-n or late-n.k>": two 200-character ids and
# the rest.
CommandId = Annotated[str, Field(min_length=1, max_length=512)]
StepKind = Literal["execute", "compensate"]
_NAMESPACE_BYTES = uuid.UUID("6f1c2b1e-0a53-4d8e-9a0e-5b7f4c1d2e3f").bytes


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

    type: str = Field(max_length=500, description="The kind of error, e.g. an exception's class name.")
    message: str = Field(max_length=10_000)
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


class StepResult(Envelope):
    """Worker to orchestrator: the outcome of one command (``<prefix>.results``)."""

    event_type: Literal["step.result"] = "step.result"
    body: ResultBody


class AuditAction(_Frozen):
    """One thing a transition did: a step dispatched, a result taken, a state entered."""

    action: str = Field(description="e.g. step_dispatched, step_succeeded, retry_scheduled, saga_completed.")
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


Message = StartSaga | CancelSaga | StepCommand | StepResult | SagaEvent
MESSAGE_TYPES: dict[str, type[Envelope]] = {
    "saga.start": StartSaga,
    "saga.cancel": CancelSaga,
    "step.command": StepCommand,
    "step.result": StepResult,
    "saga.transition": SagaEvent,
}
MESSAGE_ADAPTER: TypeAdapter[Message] = TypeAdapter(Annotated[Message, Field(discriminator="event_type")])
