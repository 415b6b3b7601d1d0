"""A worker killed with ``kill -9`` while commands are in flight: its replacement runs again only the
commands whose results were not published. Those that finished, including the ones behind a stalled
command on its partition (past the watermark), were committed as done and are not run again."""

from __future__ import annotations

import asyncio
import time

import pytest

from .harness import World

pytestmark = [pytest.mark.reliability, pytest.mark.kafka, pytest.mark.redis]


@pytest.mark.timeout(300)
async def test_a_worker_killed_with_commands_in_flight_reruns_only_those(world: World) -> None:
    await world.up(orchestrators=1, workers=0)
    worker = world.worker()
    await worker.ready()
    stalls = await world.submit(["stall"] * 4)
    oks = await world.submit(["ok"] * 40)
    await world.wait_final(oks)
    stalled = await world.command_ids(stalls, "reserve")

    async def runs() -> dict[str, int]:
        raw = await world.record.hgetall(f"{world.prefix}:runs")
        return {k.decode(): int(v) for k, v in raw.items()}

    deadline = time.monotonic() + 60
    while not stalled <= set(await runs()):
        assert time.monotonic() < deadline, "the stalled commands never started"
        await asyncio.sleep(0.2)
    # The worker commits in the background every few milliseconds; give it ample time.
    await asyncio.sleep(2)
    worker.kill9()
    await world.worker().ready()
    report = await world.verify([*stalls, *oks], handlers_once=False)
    assert report.states == {"completed": 44}
    counted = await runs()
    assert {cid: n for cid, n in counted.items() if n != 1} == dict.fromkeys(stalled, 2)
