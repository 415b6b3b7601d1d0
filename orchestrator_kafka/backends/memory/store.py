"""The in-process state store, with the semantics of the Redis one: versioned atomic transitions, event
dedupe, outboxes, durable timers and indexes. Every operation is atomic with respect to other coroutines
of the event loop, because none awaits inside its critical section.
"""

from __future__ import annotations

import heapq
import time
from bisect import insort
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice

from ...constants import DEDUPE_TTL_SECONDS
from ...context import SagaContext, storable
from ...errors import StateStoreError, ValidationError
from ...ports import IStateStore
from ...values import ApplyResult, OutboxMessage, PendingOutbox, Timer, TransitionWrite
from ..writes import saga_json

# ---------------------------------------------------------------- the state store


@dataclass(slots=True)
class _Record:
    # Stored as JSON so no caller ever holds a reference into the store's state.
    json: bytes
    version: int
    workflow_id: str
    state: str


@dataclass(slots=True)
class _Processed:
    # A saga's processed event ids, forgotten together at ``expires_at``, as Redis expires their set.
    event_ids: set[str]
    expires_at: float


class InMemoryStateStore(IStateStore):
    """A state store in this process's memory, with the semantics of the Redis one
    (:class:`~orchestrator_kafka.backends.redis.RedisStateStore`), which the state-store contract tests
    hold both to.

    Processed event ids are remembered per saga for ``dedupe_ttl`` seconds after the saga's last applied
    event, on ``clock`` (seconds; monotonic by default, and a test may pass a fake one). Once the store
    is closed, every method that would read or write raises
    :class:`~orchestrator_kafka.errors.StateStoreError`.

    Raises:
        ValidationError: ``dedupe_ttl`` is not positive.
    """

    def __init__(
        self, *, dedupe_ttl: float = DEDUPE_TTL_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if dedupe_ttl <= 0:
            raise ValidationError(f"dedupe_ttl must be a positive number of seconds, not {dedupe_ttl!r}")
        self._ttl = dedupe_ttl
        self._clock = clock
        self._closed = False
        self._sagas: dict[str, _Record] = {}
        # In order of expiry: the ttl is one for all and the clock only goes forward, so refreshing a
        # saga's ids moves them to the end, and the expired ones are always at the front.
        self._processed: OrderedDict[str, _Processed] = OrderedDict()
        self._outbox: dict[str, list[tuple[int, tuple[OutboxMessage, ...]]]] = {}
        self._timers: dict[str, tuple[Timer, float]] = {}
        self._saga_timers: dict[str, set[str]] = {}
        self._due: list[tuple[float, str]] = []
        self._by_workflow: dict[str, set[str]] = defaultdict(set)
        self._by_state: dict[str, set[str]] = defaultdict(set)

    def _check_open(self) -> None:
        if self._closed:
            raise StateStoreError("the in-memory state store is closed")

    def _put(self, ctx: SagaContext, raw: bytes) -> None:
        self._unindex(ctx.transaction_id)
        self._sagas[ctx.transaction_id] = _Record(raw, ctx.version, ctx.workflow_id, str(ctx.state))
        self._by_workflow[ctx.workflow_id].add(ctx.transaction_id)
        self._by_state[str(ctx.state)].add(ctx.transaction_id)

    def _unindex(self, tx: str) -> None:
        old = self._sagas.get(tx)
        if old is not None:
            self._by_workflow[old.workflow_id].discard(tx)
            self._by_state[old.state].discard(tx)

    async def save_context(self, context: SagaContext) -> None:
        """Save or overwrite ``context`` as it is, version included (an operator's repair); the indexes
        follow its workflow and state.

        Raises:
            ValidationError: ``context`` is not a valid saga; nothing was written.
        """
        raw = storable(context)
        self._check_open()
        self._put(context, raw)

    async def load_context(self, transaction_id: str) -> SagaContext | None:
        """The saga ``transaction_id`` (a copy), or None if it does not exist."""
        self._check_open()
        record = self._sagas.get(transaction_id)
        return None if record is None else SagaContext.from_json(record.json)

    async def load_contexts(self, transaction_ids: Sequence[str]) -> dict[str, SagaContext]:
        """The sagas that exist among ``transaction_ids`` (copies)."""
        if not transaction_ids:
            return {}
        self._check_open()
        return {
            tx: SagaContext.from_json(record.json)
            for tx in transaction_ids
            if (record := self._sagas.get(tx)) is not None
        }

    async def delete_context(self, transaction_id: str) -> bool:
        """Delete the saga, its outbox, its timers and its index entries; True if the saga existed.

        Its processed event ids are kept until they expire, so a late redelivery is still a duplicate.
        """
        self._check_open()
        self._outbox.pop(transaction_id, None)
        for timer_id in self._saga_timers.pop(transaction_id, ()):
            self._timers.pop(timer_id, None)
        if transaction_id not in self._sagas:
            return False
        self._unindex(transaction_id)
        del self._sagas[transaction_id]
        return True

    async def list_contexts(self, workflow_id: str | None = None, state: str | None = None) -> list[str]:
        """Transaction ids of the sagas of ``workflow_id`` in ``state`` (None matches any), sorted."""
        self._check_open()
        found = set(self._sagas)
        if workflow_id is not None:
            found &= self._by_workflow.get(workflow_id, set())
        if state is not None:
            found &= self._by_state.get(str(state), set())
        return sorted(found)

    def _processed_ids(self, now: float) -> OrderedDict[str, _Processed]:
        """The processed event ids of every saga, the expired ones forgotten first."""
        processed = self._processed
        # Redis keeps a key up to its expiry time, inclusive.
        while processed and next(iter(processed.values())).expires_at < now:
            processed.popitem(last=False)
        return processed

    async def apply(self, writes: Sequence[TransitionWrite]) -> list[ApplyResult]:
        """Apply each write atomically and in order; one result per write, with the statuses of
        :class:`~orchestrator_kafka.ports.ApplyResult` and the rules of the Redis store's ``apply``.

        Raises:
            ValidationError: a write's saga is not its transaction's, not at ``expected_version + 1``,
                or cannot be stored; the whole batch is refused and nothing is written.
        """
        if not writes:
            return []
        stored = [saga_json(w) for w in writes]  # every write is checked before any is applied
        self._check_open()
        # One instant for the whole batch, as Redis's clock stands still while a script runs.
        now = self._clock()
        processed = self._processed_ids(now)
        results: list[ApplyResult] = []
        conflicted: set[str] = set()
        for w, raw in zip(writes, stored, strict=True):
            tx = w.transaction_id
            seen = processed.get(tx)
            if seen is not None and w.event_id in seen.event_ids:
                results.append(self._duplicate(tx))
                continue
            record = self._sagas.get(tx)
            version = 0 if record is None else record.version
            if tx in conflicted or version != w.expected_version:
                conflicted.add(tx)
                results.append(ApplyResult("conflict", tx))
                continue
            self._cancel_timers(tx, w.cancel_timers)
            if w.saga is None or raw is None:
                results.append(ApplyResult("unchanged", tx))
                continue
            self._put(w.saga, raw)
            outbox_id = w.saga.version
            if w.outbox:
                # Kept in outbox id order, as Redis's sorted set keeps them, even after a repair
                # (save_context) moved the version back.
                insort(self._outbox.setdefault(tx, []), (outbox_id, w.outbox), key=_outbox_id)
            if w.timers:
                saga_timers = self._saga_timers.setdefault(tx, set())
                for timer in w.timers:
                    self._timers[timer.timer_id] = (timer, timer.due_at)
                    saga_timers.add(timer.timer_id)
                    heapq.heappush(self._due, (timer.due_at, timer.timer_id))
            if seen is None:
                seen = processed[tx] = _Processed(set(), now)
            seen.event_ids.add(w.event_id)
            seen.expires_at = now + self._ttl
            processed.move_to_end(tx)
            results.append(ApplyResult("applied", tx, outbox_id if w.outbox else 0, w.outbox))
        return results

    def _cancel_timers(self, tx: str, timer_ids: Sequence[str]) -> None:
        saga_timers = self._saga_timers.get(tx, set())
        for timer_id in timer_ids:
            self._timers.pop(timer_id, None)
            saga_timers.discard(timer_id)
        if not saga_timers:
            self._saga_timers.pop(tx, None)

    def _duplicate(self, tx: str) -> ApplyResult:
        entries = self._outbox.get(tx, [])
        if not entries:
            return ApplyResult("duplicate", tx)
        return ApplyResult("duplicate", tx, entries[-1][0], tuple(m for _, batch in entries for m in batch))

    async def ack_outbox(self, acks: Sequence[tuple[str, int]]) -> None:
        """Forget each saga's outbox entries up to ``outbox_id``."""
        if not acks:
            return
        self._check_open()
        for tx, outbox_id in acks:
            entries = [e for e in self._outbox.get(tx, []) if e[0] > outbox_id]
            if entries:
                self._outbox[tx] = entries
            else:
                self._outbox.pop(tx, None)

    async def pending_outboxes(self, limit: int = 1000) -> list[PendingOutbox]:
        """Up to ``limit`` sagas whose outbox is not empty, each with all its messages, oldest first."""
        if limit <= 0:
            return []
        self._check_open()
        return [
            PendingOutbox(tx, entries[-1][0], tuple(m for _, b in entries for m in b))
            for tx, entries in islice(self._outbox.items(), limit)
        ]

    async def claim_due_timers(self, now: float, limit: int, lease: float) -> list[Timer]:
        """Claim up to ``limit`` timers due by ``now``, earliest first; each is rescheduled to
        ``now + lease``, and only a write's ``cancel_timers`` deletes it."""
        if limit <= 0:
            return []
        self._check_open()
        claimed: list[Timer] = []
        while self._due and self._due[0][0] <= now and len(claimed) < limit:
            due, timer_id = heapq.heappop(self._due)
            entry = self._timers.get(timer_id)
            if entry is None or entry[1] != due:
                continue  # cancelled, or re-leased: a newer heap entry stands for it
            timer = entry[0]
            self._timers[timer_id] = (timer, now + lease)
            heapq.heappush(self._due, (now + lease, timer_id))
            claimed.append(timer)
        return claimed

    async def close(self) -> None:
        """Close the store; idempotent. It cannot be used afterwards (as a Redis store cannot)."""
        self._closed = True


def _outbox_id(entry: tuple[int, tuple[OutboxMessage, ...]]) -> int:
    return entry[0]
