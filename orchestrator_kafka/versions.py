"""The workflow versions an orchestrator carries: every version of each workflow it was given, and the
one new sagas take. Pure: no I/O.

A saga records its workflow's version at start and runs on it to its end, so during a rollout an
orchestrator carries the old version (for sagas in flight) beside the new one (for new sagas).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .errors import ValidationError
from .workflow import WorkflowDefinition


class Versions:
    """Workflow definitions by id and version.

    New sagas of a workflow take the version named in ``defaults``, else the one given last.

    Raises:
        ValidationError: no definition, two definitions of one workflow with the same version, or a
            default that names a workflow or version not given.
    """

    __slots__ = ("_by_id", "_defaults")

    def __init__(
        self, definitions: Sequence[WorkflowDefinition], defaults: Mapping[str, str] | None = None
    ) -> None:
        if not definitions:
            raise ValidationError("an Orchestrator needs at least one workflow definition")
        self._by_id: dict[str, dict[str, WorkflowDefinition]] = {}
        self._defaults: dict[str, WorkflowDefinition] = {}
        for definition in definitions:
            versions = self._by_id.setdefault(definition.get_id(), {})
            if definition.version in versions:
                raise ValidationError(
                    f"two definitions of workflow {definition.get_id()!r} have version"
                    f" {definition.version!r}: give one of them another version"
                )
            versions[definition.version] = definition
            self._defaults[definition.get_id()] = definition  # the last given, unless named below
        for workflow_id, version in (defaults or {}).items():
            chosen = self._by_id.get(workflow_id, {}).get(version)
            if chosen is None:
                raise ValidationError(
                    f"default version {version!r} of workflow {workflow_id!r} is not among the definitions"
                    f" given: {self.versions(workflow_id)}"
                )
            self._defaults[workflow_id] = chosen

    def ids(self) -> list[str]:
        """The workflow ids, in the order first given."""
        return list(self._by_id)

    def defaults(self) -> dict[str, WorkflowDefinition]:
        """The definition new sagas take, by workflow id."""
        return dict(self._defaults)

    def all(self) -> list[WorkflowDefinition]:
        """Every definition, every version."""
        return [d for versions in self._by_id.values() for d in versions.values()]

    def versions(self, workflow_id: str) -> list[str]:
        """The versions of ``workflow_id`` carried, in the order given."""
        return list(self._by_id.get(workflow_id, {}))

    def default(self, workflow_id: str) -> WorkflowDefinition | None:
        """The definition new sagas of ``workflow_id`` take, or None for an unknown workflow."""
        return self._defaults.get(workflow_id)

    def get(self, workflow_id: str, version: str) -> WorkflowDefinition | None:
        """The definition of ``version`` of ``workflow_id``, or None when it is not carried. A saga
        stored before versions (``version`` empty) runs on the default."""
        if not version:
            return self._defaults.get(workflow_id)
        return self._by_id.get(workflow_id, {}).get(version)
