"""Workflow definitions: :class:`WorkflowStep`, :class:`RetryPolicy`, :class:`WorkflowBuilder` and the
immutable :class:`WorkflowDefinition` it builds. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .context import SagaContext
from .errors import ValidationError

Condition = Callable[[SagaContext], bool]

# Worker names become Kafka topic names, so they use Kafka's topic alphabet.
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,200}$")


def _check_name(what: str, value: object) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValidationError(
            f"{what} must be 1 to 200 characters of letters, digits, '.', '_' or '-', got {value!r}"
        )
    return value


class IWorkflowDefinition(ABC):
    """A workflow definition, as the API reference describes it."""

    @abstractmethod
    def get_id(self) -> str:
        """The workflow id."""

    @abstractmethod
    def get_steps(self) -> list[WorkflowStep]:
        """Every step, in definition order."""

    @abstractmethod
    def get_initial_step(self) -> WorkflowStep | None:
        """The first step, or None for an empty workflow."""

    @abstractmethod
    def get_next_step(self, current_step: str, context: SagaContext) -> WorkflowStep | None:
        """The step after ``current_step`` on ``context``, or None when the workflow is done."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how late a failed or timed-out attempt is tried again.

    Retry ``n`` (1-based) waits ``initial_delay * backoff_factor ** (n - 1)`` seconds, capped at
    ``max_delay``. ``max_retries=3`` means up to four attempts in all.

    Raises:
        ValidationError: a negative or non-finite number, a backoff factor below 1, or
            ``max_delay < initial_delay``.
    """

    max_retries: int = 3
    backoff_factor: float = 2.0
    initial_delay: float = 1.0
    max_delay: float = 60.0

    def __post_init__(self) -> None:
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int):
            raise ValidationError(f"max_retries must be an int, got {self.max_retries!r}")
        if self.max_retries < 0:
            raise ValidationError(f"max_retries must be >= 0, got {self.max_retries}")
        for name in ("backoff_factor", "initial_delay", "max_delay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValidationError(f"{name} must be a finite number, got {value!r}")
        if self.backoff_factor < 1:
            raise ValidationError(f"backoff_factor must be >= 1, got {self.backoff_factor}")
        if self.initial_delay < 0:
            raise ValidationError(f"initial_delay must be >= 0, got {self.initial_delay}")
        if self.max_delay < self.initial_delay:
            raise ValidationError(
                f"max_delay ({self.max_delay}) must be >= initial_delay ({self.initial_delay})"
            )

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1-based); never more than ``max_delay``."""
        if self.initial_delay == 0:
            return 0.0
        # Compared in logs: backoff_factor ** (retry - 1) overflows a float long before max_retries ends.
        if (retry - 1) * math.log(self.backoff_factor) >= math.log(self.max_delay / self.initial_delay):
            return float(self.max_delay)
        return float(min(self.max_delay, self.initial_delay * self.backoff_factor ** (retry - 1)))


@dataclass(frozen=True, slots=True)
class WorkflowStep:
    """One step: the worker that does it, the worker that undoes it, and how long to wait for each.

    ``compensation_timeout`` and ``compensation_retry`` are the compensation's own; None means the
    step's ``timeout`` and ``retry``."""

    name: str
    worker_name: str
    compensation: str | None = None
    timeout: float | None = None
    retry: RetryPolicy | None = None
    condition: Condition | None = field(default=None, compare=False)
    compensation_timeout: float | None = None
    compensation_retry: RetryPolicy | None = None

    def timeout_of(self, kind: str) -> float | None:
        """The timeout of a command of ``kind`` (``execute`` or ``compensate``)."""
        if kind == "compensate" and self.compensation_timeout is not None:
            return self.compensation_timeout
        return self.timeout

    def retry_of(self, kind: str) -> RetryPolicy | None:
        """The step's own retry policy for a command of ``kind``, or None for the workflow's."""
        if kind == "compensate" and self.compensation_retry is not None:
            return self.compensation_retry
        return self.retry


def condition_name(condition: Condition | None) -> str:
    """The name a condition is known by in a fingerprint and a graph: its function's qualified name
    (a lambda's is ``<lambda>``); empty for none."""
    if condition is None:
        return ""
    return str(getattr(condition, "__qualname__", None) or type(condition).__qualname__)


def fingerprint(stages: Sequence[Sequence[WorkflowStep]]) -> str:
    """The version of a definition that names none: a hash of its shape. Steps, their order and
    grouping, workers, compensations and condition names count; timeouts and retry policies do not,
    since a saga in flight can take a changed one without harm."""
    shape = [
        [[s.name, s.worker_name, s.compensation or "", condition_name(s.condition)] for s in stage]
        for stage in stages
    ]
    return hashlib.sha256(repr(shape).encode()).hexdigest()[:12]


class WorkflowDefinition(IWorkflowDefinition):
    """An immutable workflow: stages of steps, run in order; a parallel group is one stage.

    ``version`` names this shape of the workflow: given to the builder, or :func:`fingerprint`. A saga
    records it at start and runs on it to its end."""

    __slots__ = ("_by_name", "_id", "_retry", "_stage_of", "_stages", "_steps", "_version")

    def __init__(
        self,
        workflow_id: str,
        stages: Sequence[Sequence[WorkflowStep]],
        retry: RetryPolicy,
        version: str | None = None,
    ) -> None:
        self._id = workflow_id
        self._stages: tuple[tuple[WorkflowStep, ...], ...] = tuple(tuple(s) for s in stages)
        self._retry = retry
        self._steps = tuple(step for stage in self._stages for step in stage)
        self._by_name = {step.name: step for step in self._steps}
        self._stage_of = {step.name: i for i, stage in enumerate(self._stages) for step in stage}
        self._version = version or fingerprint(self._stages)

    def __repr__(self) -> str:
        return (
            f"WorkflowDefinition({self._id!r}, version={self._version!r}, "
            f"steps={[s.name for s in self._steps]})"
        )

    def get_id(self) -> str:
        return self._id

    @property
    def version(self) -> str:
        """The version of this definition: given to the builder, or the fingerprint of its shape."""
        return self._version

    def get_steps(self) -> list[WorkflowStep]:
        return list(self._steps)

    def get_initial_step(self) -> WorkflowStep | None:
        return self._steps[0] if self._steps else None

    def get_next_step(self, current_step: str, context: SagaContext) -> WorkflowStep | None:
        """The first step of the stages after ``current_step``'s whose condition holds on ``context``.

        Raises:
            ValidationError: ``current_step`` is not a step of this workflow.
        """
        stage = self._stage_of.get(current_step)
        if stage is None:
            raise ValidationError(f"workflow {self._id!r} has no step {current_step!r}")
        for later in self._stages[stage + 1 :]:
            for step in later:
                if step.condition is None or step.condition(context):
                    return step
        return None

    @property
    def stages(self) -> tuple[tuple[WorkflowStep, ...], ...]:
        """The steps grouped in stages: one step each, or the branches of a parallel group."""
        return self._stages

    @property
    def retry_policy(self) -> RetryPolicy:
        """The workflow-wide retry policy, for steps without their own."""
        return self._retry

    def step(self, name: str) -> WorkflowStep | None:
        """The step called ``name``, or None."""
        return self._by_name.get(name)

    def stage_of(self, name: str) -> int:
        """The index of the stage that holds step ``name``."""
        return self._stage_of[name]

    def retry_for(self, step: WorkflowStep, kind: str = "execute") -> RetryPolicy:
        """The retry policy of ``step``'s commands of ``kind``: the compensation's own (for
        ``compensate``), else the step's own, else the workflow's."""
        return step.retry_of(kind) or self._retry


def _check_timeout(timeout: object, what: str = "timeout") -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not math.isfinite(timeout):
        raise ValidationError(f"{what} must be a positive number of seconds or None, got {timeout!r}")
    if timeout <= 0:
        raise ValidationError(f"{what} must be > 0 seconds, got {timeout}")
    return float(timeout)


def _check_retry(retry: object, what: str = "retry") -> RetryPolicy | None:
    if retry is not None and not isinstance(retry, RetryPolicy):
        raise ValidationError(f"{what} must be a RetryPolicy or None, got {type(retry).__name__}")
    return retry


_PARALLEL_KEYS = frozenset(
    {"name", "worker_name", "compensation", "timeout", "retry", "compensation_timeout", "compensation_retry"}
)


class WorkflowBuilder:
    """Fluent builder of a :class:`WorkflowDefinition`.

    Every mistake raises :class:`ValidationError` before the workflow runs: a bad name or argument
    when the step is added, duplicate step names and an empty workflow at ``build()``.

    ``version`` names the definition (letters, digits, ``.``, ``_``, ``-``); without one, it is the
    fingerprint of the definition's shape, so a changed shape is a new version by itself.
    """

    def __init__(self, workflow_id: str, version: str | None = None) -> None:
        self._id = _check_name("workflow_id", workflow_id)
        self._version = None if version is None else _check_name("version", version)
        self._stages: list[list[WorkflowStep]] = []
        self._retry = RetryPolicy()

    def _step(
        self,
        name: str,
        worker_name: str,
        compensation: str | None,
        timeout: object,
        retry: object,
        condition: Condition | None = None,
        compensation_timeout: object = None,
        compensation_retry: object = None,
    ) -> WorkflowStep:
        if compensation is None and (compensation_timeout is not None or compensation_retry is not None):
            raise ValidationError(
                f"step {name!r} has a compensation_timeout or compensation_retry but no compensation"
            )
        return WorkflowStep(
            name=_check_name("step name", name),
            worker_name=_check_name(f"worker_name of step {name!r}", worker_name),
            compensation=None
            if compensation is None
            else _check_name(f"compensation of step {name!r}", compensation),
            timeout=_check_timeout(timeout),
            retry=_check_retry(retry),
            condition=condition,
            compensation_timeout=_check_timeout(compensation_timeout, "compensation_timeout"),
            compensation_retry=_check_retry(compensation_retry, "compensation_retry"),
        )

    def add_step(
        self,
        name: str,
        worker_name: str,
        compensation: str | None = None,
        *,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        compensation_timeout: float | None = None,
        compensation_retry: RetryPolicy | None = None,
    ) -> WorkflowBuilder:
        """Add a sequential step; ``compensation`` names the worker that undoes it.

        ``timeout`` and ``retry`` apply to the step's attempts; ``compensation_timeout`` and
        ``compensation_retry`` to its compensation's, and default to the step's."""
        self._stages.append(
            [
                self._step(
                    name,
                    worker_name,
                    compensation,
                    timeout,
                    retry,
                    None,
                    compensation_timeout,
                    compensation_retry,
                )
            ]
        )
        return self

    def add_conditional_step(
        self,
        name: str,
        worker_name: str,
        condition: Condition,
        compensation: str | None = None,
        *,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        compensation_timeout: float | None = None,
        compensation_retry: RetryPolicy | None = None,
    ) -> WorkflowBuilder:
        """Add a step that runs only when ``condition(ctx)`` is true when the step is reached; the
        other arguments are :meth:`add_step`'s."""
        if not callable(condition):
            raise ValidationError(f"condition of step {name!r} must be callable, got {condition!r}")
        self._stages.append(
            [
                self._step(
                    name,
                    worker_name,
                    compensation,
                    timeout,
                    retry,
                    condition,
                    compensation_timeout,
                    compensation_retry,
                )
            ]
        )
        return self

    def add_parallel_steps(self, steps: Sequence[Mapping[str, Any]]) -> WorkflowBuilder:
        """Add a group of steps dispatched together and joined when all have succeeded.

        Each entry is a dict with ``name`` and ``worker_name``, and optionally ``compensation``,
        ``timeout``, ``retry``, ``compensation_timeout`` and ``compensation_retry``.
        """
        if isinstance(steps, str | bytes) or not isinstance(steps, Sequence) or not steps:
            raise ValidationError("add_parallel_steps takes a non-empty list of step dicts")
        group: list[WorkflowStep] = []
        for i, entry in enumerate(steps):
            if not isinstance(entry, Mapping):
                raise ValidationError(f"parallel step #{i} must be a dict, got {type(entry).__name__}")
            unknown = set(entry) - _PARALLEL_KEYS
            if unknown:
                raise ValidationError(f"parallel step #{i} has unknown keys {sorted(unknown)}")
            for key in ("name", "worker_name"):
                if key not in entry:
                    raise ValidationError(f"parallel step #{i} has no {key!r}")
            group.append(
                self._step(
                    entry["name"],
                    entry["worker_name"],
                    entry.get("compensation"),
                    entry.get("timeout"),
                    entry.get("retry"),
                    None,
                    entry.get("compensation_timeout"),
                    entry.get("compensation_retry"),
                )
            )
        self._stages.append(group)
        return self

    def with_retry_config(
        self,
        max_retries: int = 3,
        backoff_factor: float = 2.0,
        initial_delay: float = 1.0,
        max_delay: float = 60.0,
    ) -> WorkflowBuilder:
        """Set the workflow-wide retry policy; a step's own ``retry`` overrides it."""
        self._retry = RetryPolicy(max_retries, backoff_factor, initial_delay, max_delay)
        return self

    def build(self) -> WorkflowDefinition:
        """The immutable definition.

        Raises:
            ValidationError: the workflow has no step, or two steps share a name.
        """
        if not self._stages:
            raise ValidationError(f"workflow {self._id!r} has no steps")
        seen: set[str] = set()
        for stage in self._stages:
            for step in stage:
                if step.name in seen:
                    raise ValidationError(f"workflow {self._id!r} has two steps named {step.name!r}")
                seen.add(step.name)
        return WorkflowDefinition(self._id, self._stages, self._retry, self._version)
