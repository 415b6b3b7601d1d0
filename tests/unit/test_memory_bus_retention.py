"""The in-memory bus keeps a bounded log per partition, as Kafka's retention does: a process embedding
it runs for months without its topics growing."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from orchestrator_kafka import InMemoryEventBus
from orchestrator_kafka.errors import ValidationError
from orchestrator_kafka.ports import InboundMessage, OutboxMessage


def message(i: int) -> OutboxMessage:
    return OutboxMessage("t", "key", str(i).encode())


async def test_each_partition_keeps_its_newest_messages_and_offsets_keep_counting() -> None:
    bus = InMemoryEventBus(partitions=1, retention=10)
    await bus.start()
    for i in range(1000):
        await bus.publish([message(i)])
    kept = bus.messages("t")
    assert 10 <= len(kept) <= 11  # the oldest go a tenth of the retention at a time
    assert [m.offset for m in kept] == list(range(1000 - len(kept), 1000))
    assert [m.value for m in kept] == [str(m.offset).encode() for m in kept]
    assert [m.offset async for m in bus.read("t")] == [m.offset for m in kept]
    await bus.stop()


async def test_a_group_behind_the_retention_resumes_from_the_oldest_kept() -> None:
    bus = InMemoryEventBus(partitions=1, retention=10)
    await bus.start()
    await bus.publish([message(i) for i in range(100)])
    seen: list[int] = []
    done = asyncio.Event()

    async def handle(batch: Sequence[InboundMessage]) -> None:
        seen.extend(m.offset for m in batch)
        if seen[-1] == 104:
            done.set()

    await bus.subscribe(["t"], "g", handle)
    await bus.publish([message(i) for i in range(100, 105)])
    await asyncio.wait_for(done.wait(), 5)
    # From the oldest kept when it first fetched (offsets 0 to 8x were trimmed), every message once.
    assert seen == list(range(seen[0], 105)) and 89 <= seen[0] <= 95
    await bus.stop()


def test_retention_must_be_positive() -> None:
    with pytest.raises(ValidationError, match="retention"):
        InMemoryEventBus(retention=0)
