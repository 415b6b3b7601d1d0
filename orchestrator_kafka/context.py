"""The saga instance: :class:`SagaContext`, its :class:`WorkflowState` and per-step bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import orjson
import pydantic

from .errors import ValidationError


class WorkflowState(StrEnum):
    """The states of a saga. ``compensating`` is the one state beyond the API reference's six."""

    PENDING = "pending"
    RUNNING = "running"
    COMPENSATING = "compensating"
    COMPLETED = "completed"
    COMPENSATED = "compensated"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in _FINAL


_FINAL = frozenset(
    {WorkflowState.COMPLETED, WorkflowState.COMPENSATED, WorkflowState.FAILED, WorkflowState.CANCELLED}
)


class StepStatus(StrEnum):
    """Where one step of one saga stands."""

    PENDING = "pending"
    RUNNING = "running"
    RETRY_WAIT = "retry_wait"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    COMPENSATING = "compensating"
    COMPENSATION_RETRY_WAIT = "compensation_retry_wait"
    COMPENSATED = "compensated"
    COMPENSATION_FAILED = "compensation_failed"


@dataclass
class StepRuntime:
    """The engine's record of one step: its status, attempts sent and the command it awaits.

    A plain dataclass rather than a model: the engine copies and updates these on every event. Not
    slotted: orjson serialises a dataclass with a ``__dict__`` several times faster."""

    status: StepStatus = StepStatus.PENDING
    attempt: int = 0
    compensation_attempt: int = 0
    command_id: str | None = None
    succeeded_command: str | None = None
    timer_id: str | None = None
    error: str | None = None
    dispatched_at: float = 0.0  # epoch seconds of the last command sent, for the step-latency metric

    def copy(self) -> StepRuntime:
        return StepRuntime(
            self.status,
            self.attempt,
            self.compensation_attempt,
            self.command_id,
            self.succeeded_command,
            self.timer_id,
            self.error,
            self.dispatched_at,
        )


@dataclass
class LateCompensation:
    """The compensation of a late success: a success of an attempt the saga had given up on, undone
    after the fact. It is retried like any compensation; ``failed`` once its retries are spent.

    ``command_id`` is the attempt awaited (None while waiting to retry); ``timer_id`` the retry or timeout
    timer it waits on."""

    step: str
    attempt: int = 1
    command_id: str | None = None
    timer_id: str | None = None
    error: str | None = None
    failed: bool = False

    def copy(self) -> LateCompensation:
        return LateCompensation(
            self.step, self.attempt, self.command_id, self.timer_id, self.error, self.failed
        )


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(eq=True)
class SagaContext:
    """One saga instance: its state, its data and the results of its steps.

    ``get(key)`` reads the saga's data: the initial context with each completed step's dict result
    merged in, in completion order. ``step_results`` keeps each step's own result. ``version`` grows by
    one with every transition the store applies.

    A plain dataclass, not a pydantic model: the engine copies and updates one on every event, and
    attribute writes on a model cost several times more. :meth:`to_json` and :meth:`from_json` are its
    stored form; :meth:`from_json` validates every field.
    """

    transaction_id: str
    workflow_id: str
    state: WorkflowState = WorkflowState.PENDING
    current_step: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    step_results: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None
    created_at: datetime = field(default_factory=utcnow)
    updated_at: datetime = field(default_factory=utcnow)
    version: int = 0
    stage: int = 0
    steps: dict[str, StepRuntime] = field(default_factory=dict)
    completed: list[str] = field(default_factory=list)
    compensation_queue: list[str] = field(default_factory=list)
    cancel_requested: bool = False
    late_compensations: list[str] = field(default_factory=list)
    # The compensations of late successes still to settle, or failed for good, by their first command id.
    late_runs: dict[str, LateCompensation] = field(default_factory=dict)
    traceparent: str | None = None  # the W3C trace context of the saga's start
    # Unique per start (models.run_id_of), part of every command id: a saga started again under a
    # reused transaction id never takes an earlier one's results. Empty for a saga stored before runs.
    run_id: str = ""
    # The version of its workflow the saga started on, and runs on to its end. Empty for a saga stored
    # before versions: it runs on the workflow's default version.
    workflow_version: str = ""
    # Why the saga is parked (its version is not loaded by the orchestrator that handled its last
    # event), or None. Cleared when an orchestrator that has the version handles it.
    parked: str | None = None
    # The event ids of the operator repairs applied to the saga (the last REPAIRS_KEPT), so that a
    # repair redelivered after more events than the store's dedupe remembers is still applied once.
    repairs: list[str] = field(default_factory=list)

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` in the saga's data, or ``default``."""
        return self.data.get(key, default)

    def step(self, name: str) -> StepRuntime:
        """The runtime record of step ``name``, created on first use."""
        runtime = self.steps.get(name)
        if runtime is None:
            runtime = self.steps[name] = StepRuntime()
        return runtime

    def copy(self) -> SagaContext:
        """A copy whose containers and step records are its own. The values inside ``data`` and
        ``step_results`` are shared: the engine replaces them, never changes them in place."""
        new = object.__new__(SagaContext)
        fields = new.__dict__
        fields.update(self.__dict__)
        fields["data"] = dict(self.data)
        fields["step_results"] = dict(self.step_results)
        fields["steps"] = {name: rt.copy() for name, rt in self.steps.items()}
        fields["completed"] = list(self.completed)
        fields["compensation_queue"] = list(self.compensation_queue)
        fields["late_compensations"] = list(self.late_compensations)
        fields["late_runs"] = {base: run.copy() for base, run in self.late_runs.items()}
        fields["repairs"] = list(self.repairs)
        return new

    def to_json(self) -> bytes:
        """The saga as stored: JSON, dates in RFC 3339.

        Raises:
            ValidationError: a value in ``data`` or ``step_results`` is not JSON-serialisable.
        """
        try:
            return orjson.dumps(self, option=orjson.OPT_UTC_Z)
        except orjson.JSONEncodeError as exc:
            raise ValidationError(f"saga {self.transaction_id!r} cannot be stored: {exc}") from None

    @classmethod
    def from_json(cls, raw: bytes | str) -> SagaContext:
        """The saga stored as ``raw``. Fields it does not know are ignored, so an orchestrator can read
        what a newer one wrote during a rolling upgrade or a rollback.

        Raises:
            ValidationError: ``raw`` is not a valid saga.
        """
        try:
            return _ADAPTER.validate_json(raw)
        except pydantic.ValidationError as exc:
            raise ValidationError(f"not a valid saga: {exc}") from None

    def to_status(self) -> dict[str, Any]:
        """The status dict of ``Orchestrator.get_status``."""
        return {
            "transaction_id": self.transaction_id,
            "workflow_id": self.workflow_id,
            "state": self.state.value,
            "current_step": self.current_step,
            "step_results": {k: dict(v) for k, v in self.step_results.items()},
            "error": self.error,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "version": self.version,
            "run_id": self.run_id,
            "workflow_version": self.workflow_version,
            "parked": self.parked,
            "steps": {name: rt.status.value for name, rt in self.steps.items()},
            # Compensations of late successes not yet settled (they can outlive the saga's end), or
            # failed for good.
            "late_compensations": [
                {"step": run.step, "attempt": run.attempt, "failed": run.failed, "error": run.error}
                for run in self.late_runs.values()
            ],
        }


_ADAPTER: pydantic.TypeAdapter[SagaContext] = pydantic.TypeAdapter(SagaContext)


def storable(context: object) -> bytes:
    """The stored form of a saga handed to ``save_context``, checked as a load would check it: a
    dataclass takes any value at construction, so a wrong type is caught here, not at the next read.

    Raises:
        ValidationError: ``context`` is not a valid :class:`SagaContext`.
    """
    if not isinstance(context, SagaContext):
        raise ValidationError(f"expected a SagaContext, got {type(context).__name__}")
    raw = context.to_json()
    SagaContext.from_json(raw)
    return raw
