"""The saga instance: :class:`SagaContext`, its :class:`WorkflowState` and per-step bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


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
FINAL_STATES: frozenset[WorkflowState] = _FINAL


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


@dataclass(slots=True)
class StepRuntime:
    """The engine's record of one step: its status, attempts sent and the command it awaits.

    A plain dataclass rather than a model: the engine copies and updates these on every event."""

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


def utcnow() -> datetime:
    return datetime.now(UTC)


class SagaContext(BaseModel):
    """One saga instance: its state, its data and the results of its steps.

    ``get(key)`` reads the saga's data: the initial context with each completed step's dict result
    merged in, in completion order. ``step_results`` keeps each step's own result. ``version`` grows by
    one with every transition the store applies.
    """

    # Unknown fields are ignored, not refused: during a rolling upgrade (or a rollback) an orchestrator
    # must read the sagas that a newer one wrote with fields it does not know yet.
    model_config = ConfigDict(extra="ignore", validate_assignment=False)

    transaction_id: str
    workflow_id: str
    state: WorkflowState = WorkflowState.PENDING
    current_step: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    step_results: dict[str, dict[str, Any]] = Field(default_factory=dict)
    error: str | None = None
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    version: int = 0
    stage: int = 0
    steps: dict[str, StepRuntime] = Field(default_factory=dict)
    completed: list[str] = Field(default_factory=list)
    compensation_queue: list[str] = Field(default_factory=list)
    cancel_requested: bool = False
    late_compensations: list[str] = Field(default_factory=list)
    traceparent: str | None = Field(default=None, description="The W3C trace context of the saga's start.")

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` in the saga's data, or ``default``."""
        return self.data.get(key, default)

    def step(self, name: str) -> StepRuntime:
        """The runtime record of step ``name``, created on first use."""
        runtime = self.steps.get(name)
        if runtime is None:
            runtime = self.steps[name] = StepRuntime()
        return runtime

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
            "steps": {name: rt.status.value for name, rt in self.steps.items()},
        }
