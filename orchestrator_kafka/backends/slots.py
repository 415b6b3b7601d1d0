"""The slots of a per-message subscription (:meth:`IEventBus.consume`), shared by the Kafka and the in-memory
bus: each message handed over runs as its own task, at most ``concurrency`` at once; finished offsets go
into :class:`Watermarks` and are committed in the background; revoked partitions and a stopping
subscription are drained for a grace period. The bus only fetches (as many messages as slots are free)
and says how to commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Collection

from ..ports import MessageHandler
from ..values import InboundMessage
from .watermarks import Position, Watermarks

__all__ = ["Partition", "Position", "Slots"]

Partition = tuple[str, int]
"""A partition by ``(topic, partition)`` (aiokafka's ``TopicPartition`` is such a tuple)."""

_log = logging.getLogger("orchestrator_kafka.slots")

# Backoff before calling a handler that raised again with the same message: short for a blip (a publish
# that failed while the broker moved a leader), capped so a lasting failure does not spin.
_BACKOFF_START = 0.1
_BACKOFF_MAX = 5.0
# Finished offsets are gathered this long into one commit: the broker's commit round trip (~7 ms on Kafka
# 4.x) is then paid every few ms, never per message.
_COMMIT_DELAY = 0.005


class Slots:
    """Runs ``handler`` on each message :meth:`start` is given, as its own task.

    ``commit(positions)`` commits ``{(topic, partition): Position}`` (the offset, and the offsets above it
    done, as the commit's metadata) and logs its own failures (a failed commit only means more
    redelivery). ``on_free()`` is called whenever a slot frees, so the bus can fetch again.
    """

    def __init__(
        self,
        handler: MessageHandler,
        *,
        concurrency: int,
        group: str,
        commit: Callable[[dict[Partition, Position]], Awaitable[None]],
        on_free: Callable[[], None],
    ) -> None:
        self._handler = handler
        self.concurrency = concurrency
        self._group = group
        self._commit = commit
        self._on_free = on_free
        self._marks: Watermarks[Partition] = Watermarks()
        # The tasks of messages not done yet, by partition and offset (what a drain waits for: a task done
        # may still hold its slot, see MessageHandler), an event set whenever one is done, and every task
        # holding a slot.
        self._unfinished: dict[Partition, dict[int, asyncio.Task[None]]] = {}
        self._progress = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._commit_task: asyncio.Task[None] | None = None
        # Offsets a previous owner committed as done above its watermark: not run again.
        self._skip: dict[Partition, set[int]] = {}

    @property
    def free(self) -> int:
        """Slots not taken."""
        return self.concurrency - len(self._tasks)

    def tracks(self, partition: Partition) -> bool:
        """True if a message of ``partition`` was started since it was last drained."""
        return self._marks.mark(partition) is not None

    def skip(self, partition: Partition, committed: Position) -> None:
        """``partition`` is owned from ``committed`` on: the offsets it says are done are not run again."""
        if committed.done:
            self._skip[partition] = set(committed.done)

    def start(self, message: InboundMessage) -> None:
        """Take a slot and run the handler on ``message`` in it (or none, for a message a previous owner
        committed as done). The caller makes sure a slot is free and hands over each partition's
        messages in offset order."""
        where = (message.topic, message.partition)
        try:
            self._marks.take(where, message.offset)
        except ValueError:
            # Not above one taken before: it is in hand or done already (a consumer sought back).
            _log.debug("group %s: %s[%d]@%d is in hand already", self._group, *where, message.offset)
            return
        skip = self._skip.get(where)
        if skip is not None and message.offset in skip:
            skip.discard(message.offset)
            if not skip:
                del self._skip[where]
            self._finished(where, message.offset)
            return
        task = asyncio.get_running_loop().create_task(self._run(message, where))
        self._tasks.add(task)
        self._unfinished.setdefault(where, {})[message.offset] = task

    async def _run(self, message: InboundMessage, where: Partition, backoff: float = 0.0) -> None:
        """The handler on ``message`` in a slot; ``backoff``: a retry after the message was not done
        (see :meth:`_settled`), which waits that long first."""
        task = asyncio.current_task()
        try:
            if backoff:
                await asyncio.sleep(backoff)
            while True:
                try:
                    handled = await self._handler(message)
                    break
                except Exception:  # noqa: BLE001 - the message is handled again, as on a redelivery
                    backoff = min(max(backoff * 2, _BACKOFF_START), _BACKOFF_MAX)
                    _log.exception(
                        "group %s: handler failed on %s[%d]@%d; again in %.1fs",
                        self._group,
                        message.topic,
                        message.partition,
                        message.offset,
                        backoff,
                    )
                    await asyncio.sleep(backoff)
            if handled is None or handled.done is None:
                self._finished(where, message.offset)
            else:
                # Done once its result is out; the slot is free as soon as the handler returned.
                handled.done.add_done_callback(
                    functools.partial(self._settled, message, where, task, backoff)
                )
            if handled is not None and handled.hold is not None:
                # Keeps the slot (not the offset) until the handler's thread returns.
                with contextlib.suppress(Exception):
                    await handled.hold
        finally:
            self._tasks.discard(task)
            self._on_free()

    def _settled(
        self,
        message: InboundMessage,
        where: Partition,
        task: asyncio.Task[None] | None,
        backoff: float,
        done: asyncio.Future[None],
    ) -> None:
        """``message``'s handler said it is done once ``done`` resolves, and it has: mark it done, or, if
        ``done`` failed, hand it to the handler again after a backoff (in a slot of its own, even when all
        are taken: the handler only answers again, see :class:`~orchestrator_kafka.ports.Handled`)."""
        error = done.exception() if not done.cancelled() else asyncio.CancelledError()
        running = self._unfinished.get(where)
        if running is None or running.get(message.offset) is not task:
            return  # released meanwhile (revoked or stopped): it is delivered again
        if error is None:
            self._finished(where, message.offset)
            return
        backoff = min(max(backoff * 2, _BACKOFF_START), _BACKOFF_MAX)
        _log.warning(
            "group %s: %s[%d]@%d was handled but not done (%r); handled again in %.1fs",
            self._group,
            message.topic,
            message.partition,
            message.offset,
            error,
            backoff,
        )
        retry = asyncio.get_running_loop().create_task(self._run(message, where, backoff))
        self._tasks.add(retry)
        running[message.offset] = retry

    def _finished(self, where: Partition, offset: int) -> None:
        running = self._unfinished.get(where)
        if running is not None:
            running.pop(offset, None)
        self._progress.set()
        # Committed even when the watermark stays (an offset done behind an unfinished one): the
        # commit's metadata carries it, so a crash does not run it again.
        self._marks.done(where, offset)
        if self._commit_task is None:
            self._commit_task = asyncio.get_running_loop().create_task(self._commit_loop())

    async def _commit_loop(self) -> None:
        try:
            while True:
                await asyncio.sleep(_COMMIT_DELAY)
                offsets = self._marks.ready()
                if not offsets:
                    return
                try:
                    await self._commit(offsets)
                except Exception:  # noqa: BLE001 - a commit lost only means more redelivery
                    _log.exception("group %s: commit of %s failed", self._group, offsets)
        finally:
            self._commit_task = None

    async def flush(self) -> None:
        """Commit every watermark that moved, now; returns once the commit is done."""
        while self._commit_task is not None:
            await asyncio.shield(self._commit_task)
        offsets = self._marks.ready()
        if offsets:
            await self._commit(offsets)

    async def drain(self, partitions: Collection[Partition] | None, grace: float) -> None:
        """Let the handlers of ``partitions`` (None: of every partition) finish for up to ``grace``
        seconds, commit what finished, and forget those partitions. Handlers still running then are
        cancelled, and logged: their messages are left to be delivered again. With ``partitions`` None
        (stopping), handlers that are done but still hold a slot are cancelled too."""
        names = list(self._unfinished) if partitions is None else list(partitions)
        count = sum(len(self._unfinished.get(p, ())) for p in names)
        if count:
            _log.info(
                "group %s: waiting up to %.1fs for %d handler(s) of released partitions",
                self._group,
                grace,
                count,
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    while any(self._unfinished.get(p) for p in names):
                        self._progress.clear()
                        await self._progress.wait()
            late = sorted((p, o, t) for p in names for o, t in self._unfinished.get(p, {}).items())
            if late:
                _log.warning(
                    "group %s: %d handler(s) still running %.1fs after their partitions were released; "
                    "cancelled, to be delivered again: %s",
                    self._group,
                    len(late),
                    grace,
                    ", ".join(f"{topic}[{partition}]@{offset}" for (topic, partition), offset, _ in late),
                )
                tasks = {t for _, _, t in late}
                for task in tasks:
                    task.cancel()
                await asyncio.wait(tasks)
        await self.flush()
        if partitions is None:
            holding = set(self._tasks)
            for task in holding:
                task.cancel()
            if holding:
                await asyncio.wait(holding)
            names = self._marks.partitions()
        for p in names:
            self._unfinished.pop(p, None)
            self._skip.pop(p, None)
        self._marks.forget(names)
