"""Outbox acknowledgements held for a moment, so that they ride on the next write of their partition:
:class:`HeldAcks`.

The orchestrator acknowledges each batch's outbox entries once it has published them. Sent alone, that
is a second script call per partition per batch, and with ``appendfsync always`` a second AOF fsync:
measured on the hot path (``scripts/hotpath.py``), a fifth of Redis's CPU per step. Held until the
partition's next ``apply`` (usually a few milliseconds: the next batch), they cost only their own
commands inside that call. A partition with no write coming sends them on their own after ``delay``.

Holding an acknowledgement is safe: an entry acknowledged late is at worst published once more (by the
sweep, which leaves alone what moved since its last pass, or after a crash), as with a lost one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ...errors import StateStoreError

__all__ = ["HOLD_SECONDS", "Held", "HeldAcks"]

#: How long acknowledgements wait for a write of their partition before they are sent alone: well
#: above the time between two batches under load, well below the sweep's interval (5 s).
HOLD_SECONDS = 0.05

#: Sends a partition's packed acknowledgements (each of its entry alone) in a call of their own.
Send = Callable[[int, bytes], Awaitable[object]]


@dataclass(slots=True)
class Held:
    """A partition's acknowledgements waiting for a call (packed by :func:`~.packing.pack_acks`), and the
    future their callers wait on."""

    acks: list[bytes]
    sent: asyncio.Future[None]
    timer: asyncio.TimerHandle

    @property
    def packed(self) -> bytes:
        """The acknowledgements as the script reads them."""
        return b"".join(self.acks)

    def settle(self, exc: Exception | None = None) -> None:
        """Tell the callers that the call carrying these acknowledgements succeeded, or how it failed."""
        if self.sent.done():
            return
        if exc is None:
            self.sent.set_result(None)
        else:
            self.sent.set_exception(exc)
            # Its callers may all have gone (cancelled): the failure is theirs to log, not the loop's.
            self.sent.exception()


class HeldAcks:
    """Acknowledgements, each of its entry alone and packed by :func:`~.packing.pack_acks`, held per
    partition until :meth:`take` hands them to a write of that partition, or ``delay`` seconds pass and
    ``send`` sends them alone."""

    def __init__(self, send: Send, delay: float) -> None:
        self._send = send
        self._delay = delay
        self._held: dict[int, Held] = {}
        self._sending: set[asyncio.Task[None]] = set()

    def hold(self, partition: int, acks: bytes) -> asyncio.Future[None]:
        """Hold ``acks`` of ``partition``; the future resolves once a call has carried them to Redis (or
        holds its error). Await it shielded: it is shared with every caller of the partition's batch."""
        held = self._held.get(partition)
        if held is None:
            loop = asyncio.get_running_loop()
            timer = loop.call_later(self._delay, self._due, partition)
            held = self._held[partition] = Held([], loop.create_future(), timer)
        held.acks.append(acks)
        return held.sent

    def take(self, partition: int) -> Held | None:
        """The acknowledgements held for ``partition``, now the caller's to send and :meth:`Held.settle`."""
        held = self._held.pop(partition, None)
        if held is not None:
            held.timer.cancel()
        return held

    def _due(self, partition: int) -> None:
        # No write of the partition came in time: send them alone.
        held = self.take(partition)
        if held is not None:
            task = asyncio.get_running_loop().create_task(self._send_alone(partition, held))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send_alone(self, partition: int, held: Held) -> None:
        try:
            await self._send(partition, held.packed)
        except Exception as exc:  # noqa: BLE001 - handed to the callers waiting on it
            held.settle(exc)
        except BaseException:
            held.settle(StateStoreError("the call acknowledging outbox entries was cancelled"))
            raise
        else:
            held.settle()

    async def flush(self) -> None:
        """Send everything held now, and wait for the calls under way (before the store closes)."""
        for partition in list(self._held):
            self._due(partition)
        if self._sending:
            await asyncio.wait(set(self._sending))
