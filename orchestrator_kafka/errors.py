"""The one error tree of orchestrator-kafka.

Every error the library raises on purpose derives from :class:`OrchestratorError`::

    OrchestratorError
     ├── ValidationError          bad input: a definition, an argument, a message body
     ├── WorkflowExecutionError   a saga cannot do what was asked (start, cancel) in its state
     ├── StateStoreError          the state store failed or is unreachable
     │    ├── StoreFullError      the state store refuses writes: it is out of memory
     │    └── NotReplicatedError  too few replicas acknowledged a write (min_replicas) in time
     ├── ConfigurationError       a backend is set up in a way that would break a promise
     ├── EventBusError            the event bus failed or is unreachable
     └── DecodeError              a message on the wire cannot be understood (goes to the DLQ)

:class:`NonRetryableError` is not part of the tree: a step handler raises it to fail its step at once,
without retries. ``get_status`` and ``cancel_workflow`` raise the built-in :class:`ValueError` for an
unknown transaction id, as the API reference says.
"""

from __future__ import annotations


class OrchestratorError(Exception):
    """Base class of every error orchestrator-kafka raises on purpose."""


class ValidationError(OrchestratorError, ValueError):
    """Invalid input: a workflow definition, an argument of a public method, or a message body."""


class WorkflowExecutionError(OrchestratorError):
    """A saga cannot do what was asked in its current state (start failed, cancel refused)."""


class StateStoreError(OrchestratorError):
    """The state store failed or could not be reached; nothing was partially written."""


class StoreFullError(StateStoreError):
    """The state store refused a write because it is full (Redis ``maxmemory`` with ``noeviction``).

    Nothing of the refused call was written. It passes once memory frees: the orchestrator commits
    nothing for what was refused, retries with backoff and resumes by itself.
    """


class NotReplicatedError(StateStoreError):
    """Fewer replicas than the store's ``min_replicas`` acknowledged a write in time (Redis ``WAIT``).

    The write was made on the primary, but a failover could lose it, so it is not taken as written: the
    orchestrator publishes nothing of it, commits nothing, and retries with backoff; the retried writes
    come back as duplicates and are published once the replicas have them.
    """


class ConfigurationError(OrchestratorError):
    """A backend is configured in a way that would break a promise, e.g. a Redis that evicts keys
    (and so would lose sagas) when it is full; the message names the setting and why."""


class EventBusError(OrchestratorError):
    """The event bus failed or could not be reached."""


class DecodeError(OrchestratorError):
    """A message could not be decoded; ``reason`` is a short machine-readable code for the DLQ."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class NonRetryableError(Exception):
    """Raised by a step handler to fail its step at once, without retries."""
