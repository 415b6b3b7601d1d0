"""What both Kafka subscriptions share: :class:`GroupMember`, one consumer in a consumer group, started
once it has partitions, stopped once."""

from __future__ import annotations

import asyncio
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

from aiokafka import ConsumerRebalanceListener
from aiokafka.errors import KafkaError

from ...errors import EventBusError
from ...ports import Subscription
from .aiokafka_workarounds import stop_consumer

__all__ = ["GroupMember"]


class GroupMember(Subscription):
    """A consumer-group member: ``_run`` is its loop, ``_shutdown`` its way out (both the subclass's);
    ``_assigned`` is set by its rebalance listener (``_listener()``) once partitions are assigned."""

    _task_name = "kafka-member"

    def __init__(self, consumer: Any, topics: Sequence[str], group: str) -> None:
        self._consumer = consumer
        self.topics: tuple[str, ...] = tuple(topics)
        self.group = group
        self._task: asyncio.Task[None] | None = None
        self._stop_task: asyncio.Future[None] | None = None
        self._assigned = asyncio.Event()

    @property
    def assignment(self) -> frozenset[tuple[str, int]]:
        """The ``(topic, partition)`` pairs this member owns right now."""
        return frozenset((tp.topic, tp.partition) for tp in self._consumer.assignment())

    async def _start(self, wait: float) -> None:
        """Start the consumer, join the group with the subclass's ``_listener()``, wait for the first
        assignment, then run ``_run`` as a task named after ``_task_name``; on any failure the consumer is
        stopped again, so nothing is left running.

        Raises:
            EventBusError: no assignment within ``wait`` seconds, or the consumer could not start.
        """
        ok = False
        try:
            async with asyncio.timeout(wait):
                await self._consumer.start()
                self._consumer.subscribe(topics=list(self.topics), listener=self._listener())
                await self._assigned.wait()
            self._task = asyncio.create_task(self._run(), name=f"{self._task_name}[{self.group}]")
            ok = True
        except TimeoutError as exc:
            raise EventBusError(
                f"consumer group {self.group!r} got no partition assignment for {list(self.topics)} "
                f"within {wait:g}s"
            ) from exc
        except (KafkaError, OSError) as exc:
            raise EventBusError(f"consumer group {self.group!r} could not start: {exc!r}") from exc
        finally:
            if not ok:
                await stop_consumer(self._consumer, wait)

    async def stop(self) -> None:
        """Stop (see the subclass's ``_shutdown``); idempotent and safe to call concurrently."""
        if self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self._shutdown())
        # Shielded so a cancelled caller does not leave the consumer half-closed.
        await asyncio.shield(self._stop_task)

    @abstractmethod
    def _listener(self) -> ConsumerRebalanceListener: ...

    @abstractmethod
    async def _run(self) -> None: ...

    @abstractmethod
    async def _shutdown(self) -> None: ...
