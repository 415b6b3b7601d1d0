"""Several orchestrator instances in one consumer group: instances are added, removed (SIGTERM), killed
(SIGKILL) and stalled (SIGSTOP past the session timeout, so the group evicts it, then SIGCONT, so it
wakes with a batch in hand and a cache of sagas another instance has moved on) while sagas keep
arriving. The version check rejects every stale write: no transition is applied twice, none is lost."""

from __future__ import annotations

import asyncio
import signal

import pytest

from .harness import World
from .test_crash import cancel_holds, mix

pytestmark = [pytest.mark.reliability, pytest.mark.kafka, pytest.mark.redis]

FAST = {"REL_SESSION_MS": "6000", "REL_MAX_POLL_MS": "8000"}


@pytest.mark.timeout(300)
async def test_rebalances_of_added_removed_killed_and_stalled_instances_apply_nothing_twice(
    world: World,
) -> None:
    a, b = world.orchestrator(**FAST), world.orchestrator(**FAST)
    await asyncio.gather(a.ready(), b.ready())
    await world.up(orchestrators=0, workers=2)
    ids: list[str] = []
    waves: list[asyncio.Task[None]] = []

    async def wave(n: int) -> None:
        new = await world.submit(mix(n))
        ids.extend(new)
        waves.append(asyncio.get_running_loop().create_task(cancel_holds(world, new)))

    await wave(100)
    c = world.orchestrator(**FAST)  # added
    await c.ready()
    await wave(100)
    assert await a.terminate() == 0  # removed: leaves the group at once
    await wave(100)
    b.kill9()  # killed: its partitions move after the session timeout
    d = world.orchestrator(**FAST)
    await d.ready()
    await wave(100)
    c.signal(signal.SIGSTOP)  # stalled past the session timeout: evicted, its work goes to d
    await wave(100)
    await asyncio.sleep(9)
    c.signal(signal.SIGCONT)  # wakes with whatever it had in hand and a stale cache
    await wave(100)
    await asyncio.gather(*waves)
    report = await world.verify(ids)
    assert sum(report.states.values()) == 600
    assert c.alive() and d.alive()
