"""The subscription: :class:`KafkaSubscription`, one consumer-group member running a batch handler.

What it promises (DESIGN sections 5 and 7):

* It starts only once the consumer has its partitions assigned, and a new group starts from the earliest
  offset, so a message published after ``subscribe`` returns is never missed.
* The handler gets whole ``getmany`` batches; their offsets are committed once per batch, only after the
  handler returns. When it raises, nothing is committed, the batch's partitions are sought back to the
  batch's first offsets and the batch is redelivered after a backoff (at-least-once).
* A handler may return the batch's completion (see ``BatchHandler``): the next batches are fetched and
  handed over while it runs, and the batch is committed once it finishes, in order. When a completion
  raises, no later batch is committed either; once everything in flight has settled, each partition is
  sought back to the earliest offset of a failed batch.
* A batch's commit runs while the next batch is fetched and handled: one commit in flight at a time,
  the batches handled meanwhile merged into the next one, all settled before a rebalance gives the
  partitions away (the rebalance listener waits for them) and before ``stop`` returns. The broker's commit
  round trip (~7 ms on Kafka 4.x, whose group coordinator lingers to batch writes) stays off the critical
  path.

Headers pass through untouched: the telemetry module puts W3C ``traceparent`` in them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiokafka import ConsumerRebalanceListener
from aiokafka.errors import ConsumerStoppedError, IllegalStateError, KafkaError

from ...errors import StoreFullError
from ...ports import BatchHandler, finished
from ...values import InboundMessage
from .aiokafka_workarounds import stop_consumer
from .member import GroupMember

__all__ = ["KafkaSubscription"]

_log = logging.getLogger("orchestrator_kafka.kafka")

# Backoff before redelivering a batch whose handler raised: short enough that a transient failure
# (a Redis blip) costs little, capped so a poison batch does not spin the CPU or flood the log.
_BACKOFF_START = 0.1
_BACKOFF_MAX = 5.0
# How long one getmany waits for records. Stopping cancels the wait, so this only bounds idle loops.
_POLL_TIMEOUT_MS = 1000


class KafkaSubscription(GroupMember):
    """One consumer-group member running a batch handler; made by :meth:`KafkaEventBus.subscribe`."""

    _task_name = "kafka-subscription"

    def __init__(
        self,
        consumer: Any,
        topics: Sequence[str],
        group: str,
        handler: BatchHandler,
        *,
        max_batch: int,
        stop_grace: float,
        revoke_wait: float,
        on_stopped: Callable[[KafkaSubscription], None],
    ) -> None:
        super().__init__(consumer, topics, group)
        self._handler = handler
        self._max_batch = max_batch
        self._stop_grace = stop_grace
        self._revoke_wait = revoke_wait
        self._on_stopped = on_stopped
        self._stopping = False
        # True while the loop waits (poll or backoff): only then may stop() cancel it without
        # cutting a batch in half.
        self._cancellable = False
        # Set when no batch is in hand; the revocation callback waits on it so the batch's commit
        # lands before its partitions move to another member (fewer duplicates after a rebalance).
        self._idle = asyncio.Event()
        self._idle.set()
        # Offsets of handled batches not yet sent, and the task committing them while the next
        # batches are fetched and handled.
        self._to_commit: dict[Any, int] = {}
        self._commit_task: asyncio.Task[None] | None = None
        # Handled batches whose completion (see BatchHandler) has not finished yet, oldest first: each
        # with its first and next offset per partition. The finisher task awaits them in order and
        # passes their offsets on to the commit loop.
        self._inflight: collections.deque[tuple[dict[Any, tuple[int, int]], Awaitable[None] | None]] = (
            collections.deque()
        )
        self._finisher: asyncio.Task[None] | None = None
        # After a batch failed (its handler or its completion raised): the offset each partition must be
        # sought back to. Nothing handled after the failure is committed; the loop rewinds once every
        # batch in flight has settled.
        self._rewind_to: dict[Any, int] = {}
        self._broken = False  # a completion failed: the batches behind it are not committed either
        self._backoff = _BACKOFF_START  # before redelivering after a failure; doubles up to _BACKOFF_MAX

    def _listener(self) -> ConsumerRebalanceListener:
        return _Listener(self)

    async def _shutdown(self) -> None:
        """Stop consuming after the batch in hand, then leave the group; idempotent and safe to call
        concurrently. A batch still running after the grace period (the bus's ``start_timeout``) is
        cancelled uncommitted, so it is redelivered to the group."""
        self._stopping = True
        task = self._task
        if task is not None and not task.done():
            if self._cancellable:
                task.cancel()
            done, _ = await asyncio.wait({task}, timeout=self._stop_grace)
            if not done:
                _log.warning(
                    "group %s: batch still running %.1fs after stop; cancelling it (it will be redelivered)",
                    self.group,
                    self._stop_grace,
                )
                task.cancel()
                await asyncio.wait({task})
        # The last handled batch's commit must land before the member leaves the group.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._stop_grace):
                await self._settle()
        # Bounded: aiokafka's close waits for its coordination task, which can sit in a JoinGroup (up to
        # the rebalance timeout) or wait for a coordinator forever while the broker is down.
        await stop_consumer(self._consumer, self._stop_grace)
        self._on_stopped(self)

    async def _run(self) -> None:
        consumer = self._consumer
        while not self._stopping:
            if self._rewind_to:
                # A batch failed: let everything in flight settle, go back to the earliest offset not
                # committed, and wait before trying again.
                await self._settle_inflight()
                self._rewind()
                await self._pause()
                continue
            self._cancellable = True
            try:
                records: dict[Any, list[Any]] = await consumer.getmany(
                    timeout_ms=_POLL_TIMEOUT_MS, max_records=self._max_batch
                )
            except ConsumerStoppedError:
                return
            except Exception:  # noqa: BLE001 - a consumer that dies silently is the worst outcome
                # Connection loss is retried inside aiokafka and never gets here; what does is
                # e.g. an authorization or record-size error. Keep going, slowly.
                _log.exception("group %s: fetch failed; retrying in %.1fs", self.group, self._backoff)
                await self._pause()
                continue
            finally:
                self._cancellable = False
            if not records:
                continue
            if self._rewind_to:
                # A batch failed meanwhile: these records come again after the rewind, theirs included.
                self._failed(_offsets(records))
                continue
            self._idle.clear()
            try:
                await self._handle(records)
            finally:
                self._idle.set()

    async def _pause(self) -> None:
        """Sleep the backoff (cancellable by stop), then double it; a committed batch resets it."""
        if self._stopping:
            return
        self._cancellable = True
        try:
            await asyncio.sleep(self._backoff)
        finally:
            self._cancellable = False
        self._backoff = min(self._backoff * 2, _BACKOFF_MAX)

    async def _handle(self, records: dict[Any, list[Any]]) -> None:
        """Run the handler on one batch and queue its commit, or mark it for redelivery."""
        batch = [
            InboundMessage(r.topic, r.partition, r.offset, r.key, r.value, tuple(r.headers))
            for recs in records.values()
            for r in recs
        ]
        offsets = _offsets(records)
        if self._a_completion_failed():
            # The handler never sees a batch between a failure and the rewind: whatever it would do
            # with it would come before the redelivered batches it follows.
            self._failed(offsets)
            return
        try:
            completion = await self._handler(batch)
        except Exception as exc:  # noqa: BLE001 - a failing handler gets its batch again
            if isinstance(exc, StoreFullError):  # the orchestrator says so, once per interval
                _log.debug("group %s: the state store is full; redelivering", self.group)
            else:
                _log.exception(
                    "group %s: handler failed on a batch of %d messages; redelivering it",
                    self.group,
                    len(batch),
                )
            self._failed(offsets)
            return
        if completion is None and not self._inflight and not self._rewind_to:
            self._commit(offsets)
        else:
            # Behind a completion still running, even a batch done at once waits its turn: offsets are
            # committed in order.
            self._inflight.append((offsets, completion))
            if self._finisher is None:
                self._finisher = asyncio.create_task(self._finish())

    def _a_completion_failed(self) -> bool:
        """True from a failure (a completion that raised, even one the finisher has not reached yet)
        until the loop has rewound."""
        return bool(self._rewind_to) or any(
            isinstance(c, asyncio.Future) and c.done() and (c.cancelled() or c.exception() is not None)
            for _, c in self._inflight
        )

    async def _finish(self) -> None:
        """Await the completions in flight in order; commit each batch whose completion finished, and
        none after one that failed."""
        try:
            while self._inflight:
                offsets, completion = self._inflight[0]
                ok = True
                if completion is not None:
                    try:
                        await finished(completion)
                    except StoreFullError:
                        # Redelivered like any failure; the orchestrator says so, once per interval,
                        # instead of a traceback per retry.
                        _log.debug("group %s: the state store is full; redelivering", self.group)
                        ok = False
                    except Exception:  # noqa: BLE001 - a failed completion gets its batch again
                        if not self._broken:
                            _log.exception(
                                "group %s: a batch's completion failed; redelivering from it", self.group
                            )
                        ok = False
                ok = ok and not self._broken  # nothing after a failed batch is committed
                self._inflight.popleft()
                if ok:
                    self._commit(offsets)
                else:
                    self._broken = True
                    self._failed(offsets)
        finally:
            self._finisher = None

    def _commit(self, offsets: dict[Any, tuple[int, int]]) -> None:
        self._backoff = _BACKOFF_START
        for tp, (_, end) in offsets.items():
            self._to_commit[tp] = end
        if self._commit_task is None:
            self._commit_task = asyncio.create_task(self._commit_loop())

    def _failed(self, offsets: dict[Any, tuple[int, int]]) -> None:
        for tp, (first, _) in offsets.items():
            self._rewind_to[tp] = min(first, self._rewind_to.get(tp, first))

    async def _commit_loop(self) -> None:
        # One commit in flight at a time, so committed offsets only move forward; the batches handled
        # meanwhile are merged into the next commit (latest offset per partition).
        try:
            while self._to_commit:
                offsets, self._to_commit = self._to_commit, {}
                # Only owned partitions: aiokafka refuses the whole commit if one is not assigned.
                owned = self._consumer.assignment()
                offsets = {tp: o for tp, o in offsets.items() if tp in owned}
                if not offsets:
                    continue
                try:
                    await self._consumer.commit(offsets)
                except (KafkaError, OSError) as exc:
                    # CommitFailedError after a rebalance: the partitions' new owner starts from the
                    # last committed offset and sees these messages again (at-least-once).
                    _log.warning("group %s: commit of %s failed: %r", self.group, offsets, exc)
        finally:
            self._commit_task = None

    async def _settle_inflight(self) -> None:
        """Wait until every batch in flight has finished (committed or marked for redelivery)."""
        while self._finisher is not None:
            await asyncio.shield(self._finisher)

    async def _settle(self) -> None:
        """Wait until every handled batch is settled and its commit attempted (failures are logged)."""
        await self._settle_inflight()
        while self._commit_task is not None:
            await asyncio.shield(self._commit_task)

    def _rewind(self) -> None:
        # Seek each partition back to the earliest offset of a batch that failed, dropping anything
        # prefetched after it, so the next getmany returns those messages again.
        rewind, self._rewind_to = self._rewind_to, {}
        self._broken = False
        for tp, offset in rewind.items():
            # A partition revoked meanwhile cannot be sought: its new owner reads from the committed
            # offset anyway.
            with contextlib.suppress(IllegalStateError):
                self._consumer.seek(tp, offset)


def _offsets(records: dict[Any, list[Any]]) -> dict[Any, tuple[int, int]]:
    """A fetched batch's first offset and the offset after its last, per partition."""
    return {tp: (recs[0].offset, recs[-1].offset + 1) for tp, recs in records.items()}


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka's ABC is untyped
    def __init__(self, subscription: KafkaSubscription) -> None:
        self._sub = subscription

    async def on_partitions_revoked(self, revoked: set[Any]) -> None:
        # aiokafka awaits this before re-joining, while the generation is still valid: waiting for
        # the batch in hand and its commit lets the commit succeed instead of failing with
        # CommitFailedError after the partitions have moved (which would mean duplicates).
        if not revoked:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._sub._revoke_wait):
                await self._sub._idle.wait()
                await self._sub._settle()

    async def on_partitions_assigned(self, assigned: set[Any]) -> None:
        _log.debug("group %s: assigned %s", self._sub.group, sorted(map(str, assigned)))
        self._sub._assigned.set()
