"""Publishing messages handed over one at a time in as few ``publish`` calls as possible.

A worker finishes its commands one by one, each in its own task. One ``IEventBus.publish`` per result would
cost a produce round trip and the per-call overhead of building record batches for every step; here the
results finished while the previous publish was in flight go out together in the next one, so a busy
worker publishes a batch per round trip and an idle one publishes each result at once.
"""

from __future__ import annotations

import asyncio

from .errors import EventBusError
from .ports import IEventBus
from .values import OutboxMessage

__all__ = ["CoalescingPublisher"]


class CoalescingPublisher:
    """Publishes through ``bus``, one ``publish`` call in flight at a time, gathering what comes meanwhile."""

    def __init__(self, bus: IEventBus) -> None:
        self._bus = bus
        # Messages handed over since the publish in flight began, each with its caller's future (one per
        # caller, not one shared: a cancelled caller then cancels only its own).
        self._queued: list[OutboxMessage] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._task: asyncio.Task[None] | None = None

    async def publish(self, message: OutboxMessage) -> None:
        """Publish ``message`` with whatever else is handed over meanwhile; returns once it is
        acknowledged.

        Raises:
            EventBusError: the publish call carrying it failed (every message of that call gets the error;
                publishing again is safe for at-least-once readers).
        """
        await self.submit(message)

    def submit(self, message: OutboxMessage) -> asyncio.Future[None]:
        """Hand ``message`` over to be published with whatever else is handed over meanwhile; a future
        that resolves once it is acknowledged, or fails as :meth:`publish` raises. Awaiting nothing, it
        costs a busy worker no task switch per message."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._queued.append(message)
        self._waiters.append(done)
        if self._task is None:
            self._task = loop.create_task(self._flush())
        return done

    async def _flush(self) -> None:
        try:
            while self._queued:
                batch, self._queued = self._queued, []
                waiters, self._waiters = self._waiters, []
                try:
                    await self._bus.publish(batch)
                except BaseException as exc:
                    error = exc if isinstance(exc, Exception) else EventBusError("the publish was cancelled")
                    for waiter in waiters:
                        if not waiter.done():
                            waiter.set_exception(error)
                    if not isinstance(exc, Exception):
                        raise
                else:
                    for waiter in waiters:
                        if not waiter.done():
                            waiter.set_result(None)
        finally:
            self._task = None
