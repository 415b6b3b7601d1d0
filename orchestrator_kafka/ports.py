"""The interfaces (ports).

``IOrchestrator``, ``IWorkflowDefinition``, ``IStateStore``, ``IEventBus`` and ``ILogger`` are ABCs or
runtime-checkable protocols, so ``isinstance`` works. Every method of ``IStateStore`` and ``IEventBus``
is a coroutine, and both work with ``async with``. ``IWorkflowDefinition`` lives with the workflows and
the values that cross the ports in :mod:`.values`; both are re-exported here.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, Self, runtime_checkable

from .errors import EventBusError
from .lifecycle import Service
from .paging import DEFAULT_PAGE_LIMIT
from .values import (
    ApplyResult,
    ApplyStatus,
    Headers,
    InboundMessage,
    OutboxMessage,
    PendingOutbox,
    Timer,
    TransitionWrite,
    header,
)
from .workflow import IWorkflowDefinition

if TYPE_CHECKING:
    from .context import SagaContext

__all__ = [
    "ApplyResult",
    "ApplyStatus",
    "BatchHandler",
    "Handled",
    "Headers",
    "IEventBus",
    "ILogger",
    "IOrchestrator",
    "IStateStore",
    "IWorkflowDefinition",
    "InboundMessage",
    "MessageHandler",
    "OutboxMessage",
    "PendingOutbox",
    "Subscription",
    "Timer",
    "TransitionWrite",
    "Watch",
    "WatchHandler",
    "finished",
    "header",
]


# ---------------------------------------------------------------- the orchestrator and workflows


class IOrchestrator(ABC):
    """Starts, inspects and cancels sagas."""

    @abstractmethod
    async def execute_workflow(
        self, workflow_id: str, initial_context: dict[str, Any], *, transaction_id: str | None = None
    ) -> str:
        """Start a saga and return its transaction id."""

    @abstractmethod
    async def get_status(self, transaction_id: str) -> dict[str, Any]:
        """The saga's status dict."""

    @abstractmethod
    async def cancel_workflow(self, transaction_id: str) -> bool:
        """Cancel a pending or running saga."""


@runtime_checkable
class ILogger(Protocol):
    """The logging calls the library makes; a :class:`logging.Logger` satisfies it."""

    def debug(self, msg: str, *args: Any, **kwargs: Any) -> None: ...
    def info(self, msg: str, *args: Any, **kwargs: Any) -> None: ...
    def warning(self, msg: str, *args: Any, **kwargs: Any) -> None: ...
    def error(self, msg: str, *args: Any, **kwargs: Any) -> None: ...
    def exception(self, msg: str, *args: Any, **kwargs: Any) -> None: ...


# ---------------------------------------------------------------- the state store


class IStateStore(ABC):
    """Persists sagas. Beyond the API reference's four methods, it applies the engine's transitions
    atomically (dedupe, version check, new state, outbox, timers, indexes in one step)."""

    @abstractmethod
    async def save_context(self, context: SagaContext) -> None:
        """Save or overwrite a saga as it is (an operator's repair); indexes follow."""

    @abstractmethod
    async def load_context(self, transaction_id: str) -> SagaContext | None:
        """The saga, or None."""

    @abstractmethod
    async def load_contexts(self, transaction_ids: Sequence[str]) -> dict[str, SagaContext]:
        """The sagas that exist among ``transaction_ids``, in one round trip."""

    @abstractmethod
    async def delete_context(self, transaction_id: str) -> bool:
        """Delete a saga, its outbox and its timers; True if it existed."""

    @abstractmethod
    async def list_contexts(self, workflow_id: str | None = None, state: str | None = None) -> list[str]:
        """Transaction ids of the sagas of ``workflow_id`` in ``state`` (None matches any), sorted."""

    @abstractmethod
    async def list_sagas(
        self,
        workflow_id: str | None = None,
        state: str | None = None,
        *,
        limit: int = DEFAULT_PAGE_LIMIT,
        cursor: str | None = None,
        updated_after: datetime | None = None,
        updated_before: datetime | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of the statuses of the sagas of ``workflow_id`` in ``state`` (None matches any)
        whose state last changed after ``updated_after`` and before ``updated_before``, oldest change
        first, and the cursor of the next page (None: there is none). A page costs the same however
        many sagas exist (see :mod:`orchestrator_kafka.paging`).

        Raises:
            ValidationError: an unknown state, a malformed cursor, a bad limit or a naive bound.
        """

    async def use_partitions(self, count: int) -> None:
        """Use ``count`` partitions, the count of the topics the orchestrator consumes, which the
        orchestrator passes at start: a store that lays its keys out by partition records it at first
        start and refuses another count after that. This default ignores it.

        Raises:
            ValidationError: the store recorded another count.
        """
        return None

    @abstractmethod
    async def trim(self, now: float) -> int:
        """Forget the index entries of sagas whose retention has passed by ``now`` (epoch seconds) and
        return how many went; the housekeeping loop calls it. The sagas' own keys expire by themselves.
        """

    @abstractmethod
    async def apply(self, writes: Sequence[TransitionWrite]) -> list[ApplyResult]:
        """Apply each write atomically, in order, in one round trip; a result per write."""

    @abstractmethod
    async def ack_outbox(self, acks: Sequence[tuple[str, int]], *, only: bool = False) -> None:
        """Forget the outbox messages up to ``outbox_id`` of each ``(transaction_id, outbox_id)``; with
        ``only``, just the entry ``outbox_id``. A writer acknowledging what its own write made uses
        ``only``: an older entry may be another instance's write that it has not published yet (it
        crashed, or lost the partition, in between), which the sweep must still find."""

    @abstractmethod
    async def pending_outboxes(self, limit: int = 1000) -> list[PendingOutbox]:
        """Sagas whose outbox is not empty: what a crash left unpublished."""

    @abstractmethod
    async def claim_due_timers(self, now: float, limit: int, lease: float) -> list[Timer]:
        """Claim up to ``limit`` timers due by ``now``: each is hidden from other claims for ``lease``
        seconds and deleted by the write that handles it (``cancel_timers``)."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections; idempotent."""

    async def check(self) -> None:
        """Refuse a backend set up to lose sagas; the orchestrator calls it at start. None by default.

        Raises:
            ConfigurationError: the backend is set up in a way that would lose sagas (say which, why).
            StateStoreError: the backend could not be reached.
        """
        return None  # nothing to check: a store in memory loses everything on exit anyway

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


# ---------------------------------------------------------------- the event bus


BatchHandler = Callable[[Sequence[InboundMessage]], Awaitable[Awaitable[None] | None]]
"""Handles one consumed batch. It may return an awaitable, the batch's *completion*: the bus then
commits the batch's offsets only once the completion has finished, and treats a completion that raises
as the handler raising. Meanwhile the bus may hand over the next batches, so a handler can decide batch
N+1 while batch N is still being written; completions are awaited, and offsets committed, in order."""


class Handled(NamedTuple):
    """What a :data:`MessageHandler` returns when its message is not simply done the moment it returns."""

    done: asyncio.Future[None] | None = None
    """Resolves once the message is done (its result published): only then may its offset be committed.
    One that fails or is cancelled gets the message handled again after a backoff. None: done now."""
    hold: Awaitable[None] | None = None
    """Keeps the message's slot taken until it finishes, without holding the offset back (a handler's
    thread that cannot be stopped)."""


MessageHandler = Callable[[InboundMessage], Awaitable[Handled | None]]
"""Handles one message of a :meth:`IEventBus.consume` subscription, in a slot of its own. Once it returns
None, the message is *done*: its offset may be committed (when every message before it on its partition is
done too); or it returns a :class:`Handled` saying when the message will be done, and what keeps its slot
taken meanwhile. A handler that returns frees its slot (unless ``hold`` keeps it) even before ``done``
resolves: a slot bounds the handlers running, not the results being published. One that raises is called
again with the same message after a backoff, keeping its slot; one cancelled (its partition revoked or the
subscription stopped, past the grace period) is left to be delivered again."""


async def finished(completion: Awaitable[None]) -> None:
    """Await a batch's completion (see :data:`BatchHandler`) for a bus. One that was cancelled, when the
    awaiting task was not, counts as failed.

    Raises:
        EventBusError: the completion was cancelled; or whatever the completion raised.
    """
    try:
        await completion
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
        raise EventBusError("the batch's completion was cancelled") from None


class Subscription(ABC):
    """A running consumer; ``stop`` ends it after the batch in hand."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop consuming; idempotent."""


WatchHandler = Callable[[Sequence[InboundMessage]], None]
"""Handles the messages of a :meth:`IEventBus.watch`, a batch at a time, synchronously: it must be quick
(hand slow work to a task of its own)."""


class Watch(Subscription):
    """A running :meth:`IEventBus.watch`. :meth:`ended` returns when it ends: stopped, its bus stopped,
    or failed."""

    @abstractmethod
    async def ended(self) -> None:
        """Return when the watch has ended.

        Raises:
            EventBusError: it failed (the broker went away).
        """


class IEventBus(Service):
    """Topics with keys and consumer groups, at-least-once; ``async with`` starts and stops it.

    A subscriber's handler gets batches; the bus commits their offsets only after the handler returns
    (and after the completion it returned, if any, finished), and redelivers the batch when it raises.
    """

    topic_prefix: str

    @abstractmethod
    async def start(self) -> None:
        """Connect; idempotent."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop every subscription and disconnect; idempotent."""

    @abstractmethod
    async def publish(self, messages: Sequence[OutboxMessage]) -> None:
        """Publish messages and return once every one is acknowledged.

        Raises:
            EventBusError: a message could not be published.
        """

    @abstractmethod
    async def subscribe(
        self,
        topics: Sequence[str],
        group: str,
        handler: BatchHandler,
        *,
        max_batch: int = 500,
    ) -> Subscription:
        """Consume ``topics`` as a member of consumer group ``group``; returns once partitions are
        assigned, so a message published afterwards is never missed."""

    async def consume(
        self,
        topics: Sequence[str],
        group: str,
        handler: MessageHandler,
        *,
        concurrency: int,
        grace: float = 30.0,
    ) -> Subscription:
        """Consume ``topics`` as a member of consumer group ``group``, one message at a time: each message
        is handed to ``handler`` as its own task as soon as one of ``concurrency`` slots is free, whatever
        is slow beside it; at most ``concurrency`` run at once. While every slot is taken the member
        fetches nothing more (and stays in the group). Each partition's offset is committed, in the
        background, up to its first message not done (see :data:`MessageHandler`). When partitions are
        revoked, or the subscription stops, their handlers get ``grace`` seconds to finish, what finished
        is committed, and what is still running is cancelled and left to be delivered again (logged).
        Returns once partitions are assigned, so a message published afterwards is never missed.

        Raises:
            ValidationError: no topics, or ``concurrency`` < 1, or ``grace`` < 0.
            EventBusError: not started, or this bus cannot consume per message (the default, so that
                buses written before this method keep working).
        """
        raise EventBusError(f"{type(self).__name__} cannot consume one message at a time")

    async def watch(self, topic: str, handler: WatchHandler) -> Watch:
        """Hand ``handler`` every message published to ``topic`` from now on, in no consumer group and
        committing nothing (each process that watches sees every message). Returns once the watch is in
        place: a message published after it returns is seen. It ends when stopped or when the bus stops.

        Raises:
            EventBusError: not started, no such topic, or this bus cannot watch topics (the default, so
                that buses written before this method keep working).
        """
        raise EventBusError(f"{type(self).__name__} cannot watch topics")

    @abstractmethod
    async def ensure_topics(self, topics: Sequence[str]) -> None:
        """Create the topics that do not exist yet."""

    async def partition_count(self, topic: str) -> int | None:
        """How many partitions ``topic`` has, or None if this bus cannot tell (the default, so that buses
        written before this method keep working).

        Raises:
            EventBusError: not started, or the topic does not exist.
        """
        return None

    def read(self, topic: str, *, follow: bool = False) -> AsyncIterator[InboundMessage]:
        """Every message kept on ``topic``, from the earliest, in order within each partition; with
        ``follow``, then each new one as it arrives, until the caller stops iterating. Without it, ends at
        the end the topic had when the read began. Joins no consumer group and commits nothing: for
        operators auditing a topic.

        Raises:
            EventBusError: not started, the topic does not exist, or this bus cannot read topics (the
                default, so that buses written before this method keep working).
        """
        raise EventBusError(f"{type(self).__name__} cannot read topics outside a consumer group")
