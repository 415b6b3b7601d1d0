"""What a Redis store knows of each partition's earliest timer, so that an idle orchestrator does not ask
every partition for due timers on every tick (``RedisStateStore.claim_due_timers``)."""

from __future__ import annotations

import math
from collections.abc import Iterable

from ...values import Timer


class DueTimes:
    """Per partition, the due time of the earliest timer known and when the partition was last asked,
    both on the clock the claims are given.

    A partition is asked when it was never asked, when its earliest timer is due, or once ``recheck``
    seconds have passed since it was last asked (a timer another store wrote is found then). The timers
    this store writes lower what it knows at once, even while a claim of the partition is out.
    """

    __slots__ = ("_known", "_recheck", "_written")

    def __init__(self, recheck: float) -> None:
        self._recheck = recheck
        self._known: dict[int, tuple[float, float]] = {}  # partition -> (earliest due, asked at)
        # partition -> the earliest timer written while a claim of it is out (inf: none yet)
        self._written: dict[int, float] = {}

    def to_ask(self, partition: int, now: float) -> bool:
        """Whether ``partition`` may have a timer due at ``now``, or is to be asked again anyway."""
        due, asked = self._known.get(partition, (-math.inf, -math.inf))
        return due <= now or not asked <= now < asked + self._recheck

    def asking(self, partition: int) -> None:
        """A claim of ``partition`` is about to be sent."""
        self._written[partition] = math.inf

    def answered(self, partition: int, first: float | None, now: float) -> None:
        """The claim of ``partition`` sent at ``now`` says its earliest timer is now due at ``first``
        (None: it has none). A timer written while the claim was out may not be in that answer: it is
        kept."""
        earliest = min(math.inf if first is None else first, self._written.pop(partition, math.inf))
        self._known[partition] = (earliest, now)

    def wrote(self, partition: int, timers: Iterable[Timer]) -> None:
        """This store wrote ``timers`` in ``partition``."""
        for timer in timers:
            due, asked = self._known.get(partition, (math.inf, -math.inf))
            if timer.due_at < due:
                self._known[partition] = (timer.due_at, asked)
            written = self._written.get(partition)
            if written is not None and timer.due_at < written:
                self._written[partition] = timer.due_at
