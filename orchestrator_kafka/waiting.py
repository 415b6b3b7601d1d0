"""Waiting for sagas to end: one watch of the audit topic serves every waiter of a process.

A waiter registers a future under its transaction id, makes sure the watch is in place, then reads the
saga once: a saga that ended before the watch could see it is answered from that read. From then on,
the watch hands over each audit record; a record of a saga someone waits for that enters a final state
has the saga read once and every future of it answered. Nothing polls per waiter. When the watch ends
(the bus stopped, or the broker went away), every waiter fails at once with an error that says so,
instead of hanging.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import orjson

from .context import SagaContext, WorkflowState
from .errors import EventBusError, OrchestratorError, ValidationError
from .ports import IEventBus, ILogger, Watch
from .values import InboundMessage

Load = Callable[[str], Awaitable[SagaContext | None]]
_FINAL = frozenset(s.value for s in WorkflowState if s.is_final)


class Waiters:
    """The waiters of one process (of an :class:`Orchestrator` or a :class:`SagaClient`), served by one
    watch of ``topic`` (the audit topic) on ``bus``; ``load`` reads a saga from the store."""

    def __init__(self, bus: IEventBus, load: Load, topic: str, log: ILogger) -> None:
        self._bus = bus
        self._load = load
        self._topic = topic
        self._log = log
        self._futures: dict[str, list[asyncio.Future[dict[str, Any]]]] = {}
        self._watch: Watch | None = None
        self._starting = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def waiting(self) -> int:
        """How many waiters wait now."""
        return sum(len(futures) for futures in self._futures.values())

    async def wait_for(
        self,
        transaction_id: str,
        timeout: float | None = None,  # noqa: ASYNC109 - as the public wait_for
        *,
        known: bool = False,
    ) -> dict[str, Any]:
        """The status of saga ``transaction_id`` once it is final (at once, if it is already).

        ``known``: the saga must exist already (else it may still be on its way to an orchestrator).

        Raises:
            TimeoutError: ``timeout`` seconds passed first.
            ValueError: ``known`` and there is no such saga.
            ValidationError: a negative ``timeout``.
            EventBusError: the watch could not start, or ended (the bus stopped) while waiting.
            StateStoreError: the saga could not be read.
        """
        if timeout is not None and timeout < 0:
            raise ValidationError(f"timeout must be None or >= 0 seconds, got {timeout!r}")
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._futures.setdefault(transaction_id, []).append(future)
        try:
            async with asyncio.timeout(timeout):
                await self._ensure_watch()
                # After registering and with the watch in place: a saga that ended before is seen here,
                # one that ends after, by the watch.
                saga = await self._load(transaction_id)
                if saga is None and known:
                    raise ValueError(f"unknown transaction id {transaction_id!r}")
                if saga is not None and saga.state.is_final:
                    return saga.to_status()
                return await future
        finally:
            futures = self._futures.get(transaction_id)
            if futures is not None:
                futures.remove(future)
                if not futures:
                    del self._futures[transaction_id]

    async def close(self, reason: str = "stopped waiting") -> None:
        """Stop the watch and fail every waiter with ``reason``; idempotent."""
        watch, self._watch = self._watch, None
        if watch is not None:
            await watch.stop()
        self._fail_all(OrchestratorError(reason))
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)

    async def _ensure_watch(self) -> None:
        if self._watch is not None:
            return
        async with self._starting:
            if self._watch is None:
                # Before any orchestrator ran, the audit topic may not exist yet: a client waiting for
                # its first saga makes it, as an orchestrator would.
                await self._bus.ensure_topics([self._topic])
                watch = await self._bus.watch(self._topic, self._handle)
                self._watch = watch
                self._spawn(self._guard(watch))

    async def _guard(self, watch: Watch) -> None:
        """Fail every waiter when ``watch`` ends while it is the one in use: no answer can come."""
        try:
            await watch.ended()
            why = "it stopped (the event bus stopped)"
        except Exception as exc:  # noqa: BLE001 - whatever ended the watch is the waiters' error
            why = f"it failed: {exc}"
        if self._watch is watch:
            self._watch = None
            message = f"the watch of {self._topic!r} that waiters rely on ended: {why}"
            self._log.warning("%s; failing %d waiters", message, self.waiting)
            self._fail_all(EventBusError(message))

    def _fail_all(self, error: Exception) -> None:
        for futures in self._futures.values():
            for future in futures:
                if not future.done():
                    future.set_exception(error)

    def _handle(self, batch: Sequence[InboundMessage]) -> None:
        """The watch's handler: an audit record of an awaited saga entering a final state settles it."""
        futures = self._futures
        ended: set[str] = set()
        for message in batch:
            if message.key is None:
                continue
            tx = message.key.decode("utf-8", "replace")
            if tx not in futures or tx in ended:
                continue
            try:
                to_state = orjson.loads(message.value or b"")["body"]["to_state"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                continue  # not an audit record: nothing to learn from it
            if to_state in _FINAL:
                ended.add(tx)
        for tx in ended:
            self._spawn(self._settle(tx))

    async def _settle(self, transaction_id: str) -> None:
        """Read the saga that ended and answer its waiters with its status."""
        try:
            saga = await self._load(transaction_id)
        except Exception as exc:  # noqa: BLE001 - the waiters get the store's error
            for future in self._futures.get(transaction_id, ()):
                if not future.done():
                    future.set_exception(exc)
            return
        if saga is None or not saga.state.is_final:
            return  # deleted meanwhile, or started again: the waiters wait on
        status = saga.to_status()
        for future in self._futures.get(transaction_id, ()):
            if not future.done():
                future.set_result(status)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
