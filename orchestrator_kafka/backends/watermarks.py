"""Offset tracking for per-message consumption: per partition, the offsets handed to handlers and not yet
done, and the watermark that may be committed (DESIGN section 10, "a slot per command").

Messages of one partition finish out of order; Kafka keeps one committed offset per partition. So the
offset committed is the *watermark*: the first offset taken and not yet done, or, when every offset
taken is done, the one after the last taken. The offsets above it already done are committed with it, in
the commit's metadata string (:meth:`Position.encode`, ranges relative to the watermark, as Confluent's
parallel consumer does), so the partition's next owner skips them: a crash re-delivers only what had not
finished. Pure: no I/O, no clock; shared by the Kafka and the in-memory bus.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable
from typing import Generic, NamedTuple, TypeVar

__all__ = ["Position", "Watermarks"]

P = TypeVar("P", bound=Hashable)

# Kafka refuses a commit whose metadata is longer than offset.metadata.max.bytes (4096 by default). Past
# this, the offsets done above the watermark are left out: they are delivered again (at least once).
_MAX_METADATA = 3000
_FORMAT = "done1:"


class Position(NamedTuple):
    """What to commit for a partition: the watermark, and the offsets above it already done."""

    offset: int
    done: tuple[int, ...] = ()

    def encode(self) -> str:
        """``done`` as a commit's metadata string: ``done1:`` and comma-separated ranges ``a-b`` (or
        ``a``) of offsets relative to ``offset``; empty when nothing is done above it, or when the ranges
        would not fit the broker's limit."""
        if not self.done:
            return ""
        ranges: list[str] = []
        first = last = self.done[0]
        for o in (*self.done[1:], None):
            if o is not None and o == last + 1:
                last = o
                continue
            a, b = first - self.offset, last - self.offset
            ranges.append(str(a) if a == b else f"{a}-{b}")
            if o is not None:
                first = last = o
        text = _FORMAT + ",".join(ranges)
        return text if len(text) <= _MAX_METADATA else ""

    @classmethod
    def decode(cls, offset: int, metadata: str | None) -> Position:
        """The position committed as ``offset`` with ``metadata``; metadata this module did not write
        (another client's, or garbled) counts as nothing done above the offset."""
        if not metadata or not metadata.startswith(_FORMAT):
            return cls(offset)
        done: list[int] = []
        try:
            for part in metadata[len(_FORMAT) :].split(","):
                a, _, b = part.partition("-")
                start, end = int(a), int(b or a)
                if start < 1 or end < start:
                    return cls(offset)
                done.extend(range(offset + start, offset + end + 1))
        except ValueError:
            return cls(offset)
        return cls(offset, tuple(sorted(set(done))))


class _Partition:
    __slots__ = ("changed", "done", "end", "taken")

    def __init__(self) -> None:
        self.taken: deque[int] = deque()  # offsets taken and not yet released from the front, in order
        self.done: set[int] = set()  # offsets of ``taken`` that are done (behind an unfinished one)
        self.end = -1  # the offset after the last one taken
        self.changed = False  # something was done since ready() last reported the partition

    def mark(self) -> int:
        return self.taken[0] if self.taken else self.end


class Watermarks(Generic[P]):
    """The watermark of each partition ``P`` (any hashable name, e.g. ``(topic, partition)``).

    Offsets of a partition must be taken in increasing order (as a consumer reads them); they may be done
    in any order.
    """

    def __init__(self) -> None:
        self._partitions: dict[P, _Partition] = {}

    def take(self, partition: P, offset: int) -> None:
        """Record that ``offset`` of ``partition`` was handed to a handler.

        Raises:
            ValueError: ``offset`` is not above every offset taken before on that partition.
        """
        state = self._partitions.get(partition)
        if state is None:
            state = self._partitions[partition] = _Partition()
        if offset < state.end:
            raise ValueError(f"offset {offset} of {partition!r} taken after {state.end - 1}")
        state.taken.append(offset)
        state.end = offset + 1

    def done(self, partition: P, offset: int) -> bool:
        """Record that ``offset`` of ``partition`` is done; True if the partition's watermark moved.
        An offset not taken (or of a forgotten partition) is ignored."""
        state = self._partitions.get(partition)
        if state is None or not state.taken or offset < state.taken[0] or offset in state.done:
            return False
        state.changed = True
        if offset != state.taken[0]:
            state.done.add(offset)
            return False
        taken, finished = state.taken, state.done
        taken.popleft()
        while taken and taken[0] in finished:
            finished.discard(taken.popleft())
        return True

    def unfinished(self, partition: P) -> int:
        """How many offsets of ``partition`` are taken and not done."""
        state = self._partitions.get(partition)
        return 0 if state is None else len(state.taken) - len(state.done)

    def mark(self, partition: P) -> int | None:
        """The offset to commit for ``partition`` now (the first not done, or the one after the last
        taken); None if nothing of it was taken."""
        state = self._partitions.get(partition)
        return None if state is None or state.end < 0 else state.mark()

    def ready(self) -> dict[P, Position]:
        """The position of each partition where something was done since this last reported it (its
        watermark moved, or an offset above it finished); each is then taken as committed (a failed
        commit is made good by the next one, or redelivers: at least once)."""
        out: dict[P, Position] = {}
        for partition, state in self._partitions.items():
            if state.changed:
                state.changed = False
                out[partition] = Position(state.mark(), tuple(sorted(state.done)))
        return out

    def forget(self, partitions: Iterable[P]) -> None:
        """Drop what is known of ``partitions`` (revoked: their next owner starts from the committed
        offset, and so does this member if they come back)."""
        for partition in partitions:
            self._partitions.pop(partition, None)

    def partitions(self) -> list[P]:
        """The partitions with something taken since they were last forgotten."""
        return list(self._partitions)
