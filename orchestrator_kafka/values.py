"""The plain values that cross the ports: messages, timers and the writes of transitions.

Pure data: no I/O, importable by the engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from .context import SagaContext

Headers = tuple[tuple[str, bytes], ...]


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """A message a transition must publish; kept in the saga's outbox until it is published."""

    topic: str
    key: str
    value: bytes
    headers: Headers = ()


@dataclass(frozen=True, slots=True)
class Timer:
    """A durable timer: a retry to dispatch or a timeout to check, due at ``due_at`` (epoch seconds)."""

    timer_id: str
    transaction_id: str
    due_at: float
    kind: Literal["retry", "timeout"]
    step: str
    phase: Literal["execute", "compensate"]
    attempt: int
    command_id: str | None = None


@dataclass(frozen=True, slots=True)
class TransitionWrite:
    """One event's effect, applied atomically by :meth:`IStateStore.apply`.

    ``saga`` is the new state (its ``version`` is ``expected_version + 1``), or None when the event
    changes nothing and only the version check applies. ``expected_version`` 0 means the saga must not
    exist yet.
    """

    event_id: str
    transaction_id: str
    expected_version: int
    saga: SagaContext | None = None
    outbox: tuple[OutboxMessage, ...] = ()
    timers: tuple[Timer, ...] = ()
    cancel_timers: tuple[str, ...] = ()


ApplyStatus = Literal["applied", "duplicate", "conflict", "unchanged"]


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What :meth:`IStateStore.apply` did with one write.

    ``applied``: written, and ``outbox`` is the write's own messages under ``outbox_id`` (its new
    version; 0 when it had none); ``unchanged``: the version matched and there was nothing to write;
    ``duplicate``: the event id was processed before and nothing was written, and ``outbox`` is every
    message of the saga still unacknowledged, up to ``outbox_id`` (what a crash may have left
    unpublished); ``conflict``: the saga's version was not the expected one and nothing was written.
    Once a write of a saga conflicts, the later writes of that saga in the same call conflict too.
    """

    status: ApplyStatus
    transaction_id: str
    outbox_id: int = 0
    outbox: tuple[OutboxMessage, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class PendingOutbox:
    """A saga's unpublished messages, found by the recovery sweep."""

    transaction_id: str
    outbox_id: int
    messages: tuple[OutboxMessage, ...]


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """A consumed message, with where it came from."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers = ()


def header(headers: Headers | Mapping[str, bytes], name: str) -> bytes | None:
    """The value of header ``name``, or None."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    for key, value in items:
        if key == name:
            return value
    return None
