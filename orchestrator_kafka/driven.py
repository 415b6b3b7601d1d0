"""Any :class:`IWorkflowDefinition`, run by the engine: :func:`as_definition` adapts a user's own
implementation of the interface to the engine's :class:`WorkflowDefinition`. Pure: no I/O.

The interface is sequential: ``get_initial_step`` names the first step and ``get_next_step(current,
context)`` the one after a step succeeds, or None when the saga is done. The adapter lays the steps of
``get_steps()`` out in that order, one stage each, and gives each a condition that holds only when the
user's definition picks that step on the saga's data, so the engine skips the steps in between, as it
skips a conditional step. What the interface cannot say raises an error that names it:

- a step the definition picks that ``get_steps()`` does not list, or that does not come later in
  ``get_steps()`` than the step before it (going back, a loop): ``next_step_failed``, and the saga
  rolls back like a saga whose condition raised;
- ``get_next_step`` or ``get_initial_step`` raising: ``next_step_failed`` with the exception;
- parallel groups: a user's definition has none; build one with :class:`WorkflowBuilder` instead.

A workflow-wide retry policy and a version are not part of the interface: the adapter takes a
``retry_policy`` or ``version`` attribute of the definition when it has one, else the default policy and
the fingerprint of the steps.
"""

from __future__ import annotations

from typing import Any

from .context import SagaContext
from .errors import ValidationError
from .workflow import IWorkflowDefinition, RetryPolicy, WorkflowDefinition, WorkflowStep, _check_name

# The reason a driven definition could not pick the next step, first in the saga's error.
NEXT_STEP_FAILED = "next_step_failed"


class NextStepError(ValidationError):
    """A user's definition could not say which step comes next, in a way the engine can run."""

    def __init__(self, message: str) -> None:
        super().__init__(f"{NEXT_STEP_FAILED}: {message}")


def as_definition(definition: object) -> WorkflowDefinition:
    """``definition`` as the engine runs it: itself when :class:`WorkflowBuilder` built it, else a
    :class:`WorkflowDefinition` driven by its ``get_initial_step`` and ``get_next_step``.

    Raises:
        ValidationError: ``definition`` is not an :class:`IWorkflowDefinition`, or what it returns
            cannot be run; the message names the method and what it returned.
    """
    if isinstance(definition, WorkflowDefinition):
        return definition
    if not isinstance(definition, IWorkflowDefinition):
        raise ValidationError(
            f"expected an IWorkflowDefinition (or a list of them), got {type(definition).__name__}"
        )
    return _driven(definition)


def _driven(user: IWorkflowDefinition) -> WorkflowDefinition:
    kind = type(user).__name__
    workflow_id = _check_name(f"{kind}.get_id()", user.get_id())
    steps = user.get_steps()
    if not isinstance(steps, list | tuple) or not steps:
        raise ValidationError(
            f"{kind}.get_steps() must return a non-empty list of WorkflowStep, got {steps!r}"
        )
    order: dict[str, int] = {}
    for i, step in enumerate(steps):
        if not isinstance(step, WorkflowStep):
            raise ValidationError(
                f"{kind}.get_steps() item #{i} must be a WorkflowStep, got {type(step).__name__}"
            )
        _check_name(f"{kind}.get_steps() step name", step.name)
        _check_name(f"worker_name of step {step.name!r}", step.worker_name)
        if step.compensation is not None:
            _check_name(f"compensation of step {step.name!r}", step.compensation)
        if step.name in order:
            raise ValidationError(f"{kind}.get_steps() lists two steps named {step.name!r}")
        order[step.name] = i
    retry = getattr(user, "retry_policy", None) or RetryPolicy()
    if not isinstance(retry, RetryPolicy):
        raise ValidationError(f"{kind}.retry_policy must be a RetryPolicy, got {type(retry).__name__}")
    version = getattr(user, "version", None)
    if version is not None:
        _check_name(f"{kind}.version", version)
    driven = [_drive(user, kind, step, order) for step in steps]
    return WorkflowDefinition(workflow_id, [[step] for step in driven], retry, version)


def _drive(user: IWorkflowDefinition, kind: str, step: WorkflowStep, order: dict[str, int]) -> WorkflowStep:
    """``step`` with a condition that holds when ``user`` picks it on the saga's data. The step's own
    condition is not consulted: choosing the next step on the saga's data is ``get_next_step``'s job,
    as it is :meth:`WorkflowDefinition.get_next_step`'s."""
    position = order[step.name]

    def picked(context: SagaContext) -> bool:
        previous = context.completed[-1] if context.completed else None
        try:
            if previous is None:
                chosen: Any = user.get_initial_step()
                asked = f"{kind}.get_initial_step()"
            else:
                asked = f"{kind}.get_next_step({previous!r})"
                chosen = user.get_next_step(previous, context)
        except Exception as exc:  # the user's code: its failure is the saga's, named
            raise NextStepError(f"{asked} raised {type(exc).__name__}: {exc}") from exc
        if chosen is None:
            return False
        if not isinstance(chosen, WorkflowStep) or chosen.name not in order:
            raise NextStepError(f"{asked} returned {chosen!r}, which is not a step of {kind}.get_steps()")
        name = chosen.name
        if order[name] < position:
            after = f"after {previous!r}" if previous is not None else "first"
            raise NextStepError(
                f"{asked} returned step {name!r}, which does not come {after} in {kind}.get_steps():"
                " a driven definition moves forward only (no loops); build a WorkflowBuilder workflow"
            )
        return name == step.name

    # Its name in the fingerprint and the graph.
    picked.__qualname__ = picked.__name__ = f"{kind}.picks.{step.name}"
    return WorkflowStep(
        step.name,
        step.worker_name,
        step.compensation,
        step.timeout,
        step.retry,
        picked,
        step.compensation_timeout,
        step.compensation_retry,
    )
