"""The slots shared by both buses' per-message subscriptions: what they commit, and when."""

from __future__ import annotations

import asyncio

from orchestrator_kafka.backends.slots import Partition, Position, Slots
from orchestrator_kafka.values import InboundMessage

P = ("t", 0)


async def test_an_offset_done_behind_a_running_one_is_committed_in_the_metadata() -> None:
    """Only message 1 finishes; the watermark stays at 0, and the commit still goes out, carrying 1 as
    done, so a crash now would not run 1 again."""
    commits: list[dict[Partition, Position]] = []
    release = asyncio.Event()

    async def handler(message: InboundMessage) -> None:
        if message.offset == 0:
            await release.wait()

    async def commit(positions: dict[Partition, Position]) -> None:
        commits.append(positions)

    slots = Slots(handler, concurrency=2, group="g", commit=commit, on_free=lambda: None)
    for offset in (0, 1):
        slots.start(InboundMessage("t", 0, offset, b"k", b"v"))
    assert slots.free == 0
    async with asyncio.timeout(10):
        while not commits:
            await asyncio.sleep(0.001)
    assert commits == [{P: Position(0, (1,))}]
    release.set()
    async with asyncio.timeout(10):
        while commits[-1] != {P: Position(2)}:
            await asyncio.sleep(0.001)
    assert slots.free == 2
    await slots.drain(None, 1.0)
