"""The in-process state store, with the semantics of the Redis one: versioned atomic transitions, event
dedupe, outboxes, durable timers and indexes. Every operation is atomic with respect to other coroutines
of the event loop, because none awaits inside its critical section.
"""

from __future__ import annotations

import heapq
import time
from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from itertools import islice
from typing import Any

from ...constants import (
    DEDUPE_TTL_SECONDS,
    DEFAULT_FAILED_RETENTION_SECONDS,
    DEFAULT_RETENTION_SECONDS,
    EVENTS_KEPT,
)
from ...context import SagaContext, WorkflowState, storable
from ...errors import StateStoreError, ValidationError
from ...paging import DEFAULT_PAGE_LIMIT, Position, merge_page, page_query
from ...ports import IStateStore
from ...values import ApplyResult, OutboxMessage, PendingOutbox, Timer, TransitionWrite
from ..retention import check_retention
from ..writes import saga_json

# ---------------------------------------------------------------- the state store


@dataclass(slots=True)
class _Record:
    # Stored as JSON so no caller ever holds a reference into the store's state.
    json: bytes
    version: int
    workflow_id: str
    state: str
    score: int  # its index score: when it entered its state (updated_at, epoch ms)
    events: tuple[str, ...]  # the ids of its last EVENTS_KEPT applied events
    expires_at: float | None = None  # on the store's clock; None: never


@dataclass(slots=True)
class _Tombstone:
    # A deleted saga's recent event ids, forgotten at ``expires_at``, as Redis expires their set.
    event_ids: frozenset[str]
    expires_at: float


class InMemoryStateStore(IStateStore):
    """A state store in this process's memory, with the semantics of the Redis one
    (:class:`~orchestrator_kafka.backends.redis.RedisStateStore`), which the state-store contract tests
    hold both to.

    A saga remembers the ids of its last ``EVENTS_KEPT`` (16) applied events, and a deleted one's stay
    known for ``dedupe_ttl`` seconds, on ``clock`` (epoch seconds by default, and a test may pass a
    fake one). A saga expires ``retention`` seconds after it ends, or ``failed_retention`` after it
    fails, on the same clock (None keeps it for ever; an unfinished saga never expires): it is gone
    from then on, and :meth:`trim` frees what it held. Once the store is closed, every method that
    would read or write raises :class:`~orchestrator_kafka.errors.StateStoreError`.

    Raises:
        ValidationError: ``dedupe_ttl`` is not positive, or a retention is not a positive whole number
            of seconds or None.
    """

    def __init__(
        self,
        *,
        retention: int | None = DEFAULT_RETENTION_SECONDS,
        failed_retention: int | None = DEFAULT_FAILED_RETENTION_SECONDS,
        dedupe_ttl: float = DEDUPE_TTL_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if dedupe_ttl <= 0:
            raise ValidationError(f"dedupe_ttl must be a positive number of seconds, not {dedupe_ttl!r}")
        self.retention = check_retention("retention", retention)
        self.failed_retention = check_retention("failed_retention", failed_retention)
        self._ttl = dedupe_ttl
        self._clock = clock
        self._closed = False
        self._sagas: dict[str, _Record] = {}
        # In order of expiry: the ttl is one for all and the clock only goes forward, so refreshing a
        # saga's ids moves them to the end, and the expired ones are always at the front.
        self._tombstones: dict[str, _Tombstone] = {}
        self._partitions: int | None = None
        self._outbox: dict[str, list[tuple[int, tuple[OutboxMessage, ...]]]] = {}
        self._timers: dict[str, tuple[Timer, float]] = {}
        self._saga_timers: dict[str, set[str]] = {}
        self._due: list[tuple[float, str]] = []
        # One index per (state, workflow), sorted by (score, tx), as the Redis store keeps them.
        self._indexes: dict[tuple[str, str], list[Position]] = {}
        # (expires_at, tx) of ended sagas, earliest first; an entry whose saga changed since is stale.
        self._expiring: list[tuple[float, str]] = []

    def _check_open(self) -> None:
        if self._closed:
            raise StateStoreError("the in-memory state store is closed")

    def _retention_of(self, state: str) -> int | None:
        if not WorkflowState(state).is_final:
            return None
        return self.failed_retention if state == WorkflowState.FAILED else self.retention

    def _put(
        self, ctx: SagaContext, raw: bytes, *, reindex: bool = False, event_id: str | None = None
    ) -> None:
        tx, state = ctx.transaction_id, str(ctx.state)
        old = self._record(tx)
        events = () if old is None else old.events
        if event_id is not None:
            events = (*events, event_id)[-EVENTS_KEPT:]
        score = int(ctx.updated_at.timestamp() * 1000)
        if old is not None and not reindex and (old.workflow_id, old.state) == (ctx.workflow_id, state):
            score = old.score  # the index is written only when the state changes, as in Redis
        else:
            self._unindex(tx)
            insort(self._indexes.setdefault((state, ctx.workflow_id), []), (score, tx))
        record = self._sagas[tx] = _Record(raw, ctx.version, ctx.workflow_id, state, score, events)
        ttl = self._retention_of(state)
        if ttl is not None:
            record.expires_at = self._clock() + ttl
            heapq.heappush(self._expiring, (record.expires_at, tx))

    def _unindex(self, tx: str) -> None:
        old = self._sagas.get(tx)
        if old is not None:
            index = self._indexes.get((old.state, old.workflow_id), [])
            at = bisect_left(index, (old.score, tx))
            if at < len(index) and index[at] == (old.score, tx):
                del index[at]

    def _record(self, tx: str) -> _Record | None:
        """The saga ``tx``, or None if it does not exist or has expired (then forgotten now)."""
        record = self._sagas.get(tx)
        if record is not None and record.expires_at is not None and record.expires_at <= self._clock():
            self._expire(tx)
            return None
        return record

    def _expire(self, tx: str) -> bool:
        return self._forget(tx)  # its recent event ids were in its record: they go with it

    def _forget(self, tx: str) -> bool:
        """Delete the saga ``tx``, its index entry, outbox and timers; True if it was stored."""
        self._outbox.pop(tx, None)
        for timer_id in self._saga_timers.pop(tx, ()):
            self._timers.pop(timer_id, None)
        if tx not in self._sagas:
            return False
        self._unindex(tx)
        del self._sagas[tx]
        return True

    async def save_context(self, context: SagaContext) -> None:
        """Save or overwrite ``context`` as it is, version included (an operator's repair); the indexes
        follow its workflow and state.

        Raises:
            ValidationError: ``context`` is not a valid saga; nothing was written.
        """
        raw = storable(context)
        self._check_open()
        self._put(context, raw, reindex=True)

    async def load_context(self, transaction_id: str) -> SagaContext | None:
        """The saga ``transaction_id`` (a copy), or None if it does not exist."""
        self._check_open()
        record = self._record(transaction_id)
        return None if record is None else SagaContext.from_json(record.json)

    async def load_contexts(self, transaction_ids: Sequence[str]) -> dict[str, SagaContext]:
        """The sagas that exist among ``transaction_ids`` (copies)."""
        if not transaction_ids:
            return {}
        self._check_open()
        return {
            tx: SagaContext.from_json(record.json)
            for tx in transaction_ids
            if (record := self._record(tx)) is not None
        }

    async def delete_context(self, transaction_id: str) -> bool:
        """Delete the saga, its outbox, its timers and its index entries; True if the saga existed.

        Its recent event ids are kept for ``dedupe_ttl``, so a late redelivery is still a duplicate.
        """
        self._check_open()
        record = self._record(transaction_id)  # an expired saga did not exist
        if record is not None and record.events:
            self._tombstones[transaction_id] = _Tombstone(frozenset(record.events), self._clock() + self._ttl)
        return self._forget(transaction_id)

    async def list_contexts(self, workflow_id: str | None = None, state: str | None = None) -> list[str]:
        """Transaction ids of the sagas of ``workflow_id`` in ``state`` (None matches any), sorted."""
        self._check_open()
        return sorted(
            tx
            for (st, wf), index in self._indexes.items()
            if (state is None or st == str(state)) and (workflow_id is None or wf == workflow_id)
            for _, tx in index
            if self._record(tx) is not None
        )

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
        """One page of saga statuses and the next page's cursor, as
        :meth:`~orchestrator_kafka.ports.IStateStore.list_sagas` says, read as the Redis store reads it.

        Raises:
            ValidationError: an unknown state, a malformed cursor, a bad limit or a naive bound.
        """
        q = page_query(
            workflow_id,
            state,
            limit=limit,
            cursor=cursor,
            updated_after=updated_after,
            updated_before=updated_before,
        )
        self._check_open()
        candidates: list[Position] = []
        more = False
        for (st, wf), index in self._indexes.items():
            if st not in q.states or (q.workflow_id is not None and wf != q.workflow_id):
                continue
            if q.after is None:
                start = 0
            elif q.after[1] is None:
                start = bisect_right(index, q.after[0], key=_score)
            else:
                start = bisect_right(index, (q.after[0], q.after[1]))
            end = len(index) if q.before is None else bisect_left(index, q.before, key=_score)
            taken = index[start : min(start + q.limit, end)]
            more = more or len(taken) == q.limit
            candidates.extend(taken)
        page, next_cursor = merge_page(candidates, q.limit, more)
        statuses = [
            SagaContext.from_json(record.json).to_status()
            for _, tx in page
            if (record := self._record(tx)) is not None
        ]
        return statuses, next_cursor

    async def use_partitions(self, count: int) -> None:
        """Record ``count`` at first start and refuse another after that, as the Redis store does (this
        store does not lay anything out by partition).

        Raises:
            ValidationError: another count was recorded.
        """
        self._check_open()
        if self._partitions is None:
            self._partitions = count
        elif self._partitions != count:
            raise ValidationError(
                f"this store recorded {self._partitions} partitions at first start, but the topics have "
                f"{count}"
            )

    async def trim(self, now: float) -> int:
        """Forget every saga whose retention has passed on the store's own clock (``now`` is the Redis
        store's; this store expires on the clock it was given), its index entry with it; return how
        many went."""
        self._check_open()
        expiring = self._expiring
        clock = self._clock()
        removed = 0
        while expiring and expiring[0][0] <= clock:
            expires_at, tx = heapq.heappop(expiring)
            record = self._sagas.get(tx)
            if record is not None and record.expires_at == expires_at and self._expire(tx):
                removed += 1
        return removed

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
        results: list[ApplyResult] = []
        conflicted: set[str] = set()
        for w, raw in zip(writes, stored, strict=True):
            tx = w.transaction_id
            record = self._record(tx)
            if record is not None:
                duplicate = w.event_id in record.events
            else:
                tomb = self._tombstones.get(tx)
                # Redis keeps a key up to its expiry time, inclusive.
                duplicate = tomb is not None and tomb.expires_at >= now and w.event_id in tomb.event_ids
            if duplicate:
                results.append(self._duplicate(tx))
                continue
            version = 0 if record is None else record.version
            if tx in conflicted or version != w.expected_version:
                conflicted.add(tx)
                results.append(ApplyResult("conflict", tx))
                continue
            self._cancel_timers(tx, w.cancel_timers)
            if w.saga is None or raw is None:
                results.append(ApplyResult("unchanged", tx))
                continue
            self._put(w.saga, raw, event_id=w.event_id)
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

    async def ack_outbox(self, acks: Sequence[tuple[str, int]], *, only: bool = False) -> None:
        """Forget each saga's outbox entries up to ``outbox_id`` (with ``only``, just that one)."""
        if not acks:
            return
        self._check_open()
        for tx, outbox_id in acks:
            entries = [
                e for e in self._outbox.get(tx, []) if (e[0] != outbox_id if only else e[0] > outbox_id)
            ]
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


def _score(position: Position) -> int:
    return position[0]
