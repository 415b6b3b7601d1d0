"""The orchestrator's housekeeping loop: fire due timers (retries and timeouts) through the pipeline, and
now and then re-publish what a crash or a failed publish left in outboxes and trim the indexes of the
sagas whose retention has passed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from datetime import datetime

from .constants import TIMER_LEASE_SECONDS
from .context import WorkflowState
from .engine import TimerFired
from .errors import OrchestratorError, StoreFullError
from .pipeline import Pipeline
from .ports import IEventBus, ILogger, IStateStore
from .values import Timer


class Housekeeping:
    """Fires due timers every ``timer_interval`` seconds; sweeps outboxes and trims the indexes every
    ``sweep_interval``.

    Timers are claimed with a lease, so another orchestrator fires them only if this one dies before the
    write that handles them deletes them. While the store refuses writes (full), the loop backs off as
    the pipeline's :class:`~orchestrator_kafka.refusals.WriteRefusals` says; the timers it could not
    handle stay claimed and fire again when their lease ends.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        bus: IEventBus,
        store: IStateStore,
        log: ILogger,
        *,
        workflow_ids: Collection[str],
        clock: Callable[[], datetime],
        timer_interval: float,
        sweep_interval: float,
        max_batch: int,
    ) -> None:
        self._pipeline = pipeline
        self._bus = bus
        self._store = store
        self._log = log
        self._workflow_ids = tuple(workflow_ids)
        self._clock = clock
        self._timer_interval = timer_interval
        self._sweep_interval = sweep_interval
        self._max_batch = max_batch
        self._swept: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._running = False

    def start(self) -> None:
        """Start the loop in the background; idempotent."""
        if self._task is None:
            self._running = True
            self._task = asyncio.get_running_loop().create_task(self._run(), name="orchestrator-timers")

    async def stop(self) -> None:
        """End the loop and wait for it; idempotent."""
        self._running = False
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # wait(), not await: a cancel of stop() itself must not be taken for the loop's.
            await asyncio.wait({task})

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_sweep = loop.time() + self._sweep_interval
        # The flag, not only the cancel, ends the loop: redis-py can turn a cancel that lands in a read
        # into a timeout error (asyncio.timeout in Python 3.11), which the except below would swallow.
        while self._running:
            pause = self._timer_interval
            try:
                timers = await self._claim()
                if timers:
                    await self._pipeline.process([TimerFired(t) for t in timers])
                if loop.time() >= next_sweep:
                    next_sweep = loop.time() + self._sweep_interval
                    await self.sweep_outboxes()
                    # Ended sagas' keys expire by themselves; their index entries go here.
                    await self._store.trim(self._clock().timestamp())
                    if self._pipeline.telemetry.metering:
                        await self._count_in_flight()
                if len(timers) == self._max_batch:
                    continue
            except StoreFullError:
                # Counted and logged (once per interval) where it was refused; the next try waits.
                pause = max(pause, self._pipeline.refusals.delay)
            except OrchestratorError as exc:
                # A backend is down: the timers stay claimed for their lease and fire again later.
                self._log.warning("timer loop: %s", exc)
            except Exception:  # noqa: BLE001 - the timer loop must outlive any single failure
                self._log.exception("timer loop failed")
            await asyncio.sleep(pause)

    async def _claim(self) -> list[Timer]:
        try:
            return await self._store.claim_due_timers(
                self._clock().timestamp(), self._max_batch, TIMER_LEASE_SECONDS
            )
        except StoreFullError as exc:
            # Claiming moves the timers' due time (a write): a full store refuses it while any is due.
            self._pipeline.refusals.refused(exc)
            raise

    async def _count_in_flight(self) -> None:
        counts = dict.fromkeys(self._workflow_ids, 0)
        for state in (WorkflowState.PENDING, WorkflowState.RUNNING, WorkflowState.COMPENSATING):
            for workflow_id in self._workflow_ids:
                counts[workflow_id] += len(await self._store.list_contexts(workflow_id, state.value))
        self._pipeline.telemetry.set_in_flight(counts)

    async def sweep_outboxes(self, *, everything: bool = False) -> None:
        """Re-publish what a crash or a failed publish left in outboxes: at start-up everything; later,
        only what has not moved since the last sweep, not the entries of batches still publishing.

        Raises:
            StateStoreError, EventBusError: a backend failed.
        """
        pending = await self._store.pending_outboxes()
        seen, self._swept = self._swept, {p.transaction_id: p.outbox_id for p in pending}
        stale = pending if everything else [p for p in pending if seen.get(p.transaction_id) == p.outbox_id]
        if not stale:
            return
        await self._bus.publish([m for p in stale for m in p.messages])
        await self._store.ack_outbox([(p.transaction_id, p.outbox_id) for p in stale])
        self._log.info("re-published the outboxes of %d sagas", len(stale))
