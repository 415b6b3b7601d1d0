"""The slots shared by both buses' per-message subscriptions: what they commit, and when."""

from __future__ import annotations

import asyncio

from orchestrator_kafka.backends.slots import Partition, Position, Slots
from orchestrator_kafka.errors import EventBusError
from orchestrator_kafka.ports import Handled
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


async def test_a_message_is_done_when_its_handled_future_resolves_and_its_slot_frees_before() -> None:
    """The handler returns at once with a future that resolves later (a result being published): the slot
    is free at once, the offset is committed only once the future resolves."""
    commits: list[dict[Partition, Position]] = []
    published: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def handler(message: InboundMessage) -> Handled:
        return Handled(published)

    async def commit(positions: dict[Partition, Position]) -> None:
        commits.append(positions)

    slots = Slots(handler, concurrency=1, group="g", commit=commit, on_free=lambda: None)
    slots.start(InboundMessage("t", 0, 0, b"k", b"v"))
    async with asyncio.timeout(10):
        while slots.free != 1:
            await asyncio.sleep(0.001)
    await asyncio.sleep(0.05)  # ten commit delays: nothing is done, so nothing is committed
    assert commits == []
    published.set_result(None)
    async with asyncio.timeout(10):
        while not commits:
            await asyncio.sleep(0.001)
    assert commits == [{P: Position(1)}]
    await slots.drain(None, 1.0)


async def test_a_message_whose_handled_future_fails_is_handled_again_until_done() -> None:
    calls = 0
    commits: list[dict[Partition, Position]] = []

    async def handler(message: InboundMessage) -> Handled:
        nonlocal calls
        calls += 1
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if calls < 3:
            done.set_exception(EventBusError("the broker is away"))
        else:
            done.set_result(None)
        return Handled(done)

    async def commit(positions: dict[Partition, Position]) -> None:
        commits.append(positions)

    slots = Slots(handler, concurrency=1, group="g", commit=commit, on_free=lambda: None)
    slots.start(InboundMessage("t", 0, 0, b"k", b"v"))
    async with asyncio.timeout(10):  # backoffs of 0.1 and 0.2 s
        while not commits:
            await asyncio.sleep(0.005)
    assert calls == 3
    assert commits == [{P: Position(1)}]
    await slots.drain(None, 1.0)


async def test_a_drain_waits_for_handled_futures_and_releases_those_not_done_after_the_grace() -> None:
    commits: list[dict[Partition, Position]] = []
    futures: list[asyncio.Future[None]] = []

    async def handler(message: InboundMessage) -> Handled:
        futures.append(asyncio.get_running_loop().create_future())
        return Handled(futures[-1])

    async def commit(positions: dict[Partition, Position]) -> None:
        commits.append(positions)

    slots = Slots(handler, concurrency=2, group="g", commit=commit, on_free=lambda: None)
    for offset in (0, 1):
        slots.start(InboundMessage("t", 0, offset, b"k", b"v"))
    async with asyncio.timeout(10):
        while len(futures) < 2:
            await asyncio.sleep(0.001)
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, futures[0].set_result, None)
    await slots.drain([P], 0.3)  # offset 0 is done within the grace, offset 1 never is
    assert commits[-1] == {P: Position(1)}
    futures[1].set_result(None)  # too late: the partition was released, nothing more is committed
    await asyncio.sleep(0.05)
    assert commits[-1] == {P: Position(1)}
    assert not slots.tracks(P)
