"""Crash safety (DESIGN section 6): the orchestrator process dies (``os._exit(9)``, as abrupt as kill -9)
at a chosen point of its write-publish-commit cycle, or is SIGKILLed at random moments under load, and a
new one finishes every saga: none is lost, no transition is applied twice, no command runs twice, the
outboxes left behind are re-published, and the retry and timeout timers survive and fire once."""

from __future__ import annotations

import asyncio
import random

import pytest

from .harness import World

pytestmark = [pytest.mark.reliability, pytest.mark.kafka, pytest.mark.redis]


def mix(n: int) -> list[str]:
    """n plans: half succeed, the rest fail and compensate, retry, time out and retry, or get cancelled."""
    cycle = ["ok", "ok", "fail", "ok", "flaky", "ok", "slow", "ok", "fail", "hold"]
    return [cycle[i % len(cycle)] for i in range(n)]


async def start_load(world: World, n: int) -> list[str]:
    plans = mix(n)
    ids = await world.submit(plans)
    return ids


async def cancel_holds(world: World, ids: list[str]) -> None:
    await world.wait_progress(ids, at_least=len(ids) // 2)
    await world.cancel([tx for tx in ids if tx.endswith("-hold")])


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "crash",
    ["before_write:4", "after_write:4", "after_publish:6", "compensating:3"],
)
async def test_a_crash_at_each_point_of_the_cycle_loses_nothing_and_repeats_nothing(
    world: World, crash: str
) -> None:
    doomed = world.orchestrator(crash=crash)
    await doomed.ready()
    await world.up(orchestrators=0, workers=1)
    ids = await start_load(world, 200)
    assert await doomed.exited(timeout=120) == 9, doomed.output()[-3000:]
    assert "REL_CRASH: exiting at" in doomed.output()
    # Let the in-flight steps answer and the timers fall due with nobody there to take them.
    await asyncio.sleep(2)
    await world.up(orchestrators=1, workers=0)
    await cancel_holds(world, ids)
    report = await world.verify(ids)
    assert report.states.get("completed", 0) >= 100
    assert report.states.get("compensated", 0) >= 40


@pytest.mark.timeout(300)
async def test_random_kill_9_of_orchestrators_under_load(world: World) -> None:
    """Two orchestrators in one group and two workers; six times, at a random moment 1-2.5 s apart, one
    orchestrator is SIGKILLed and another started, while 400 sagas run."""
    rng = random.Random(7)
    fast = {"REL_SESSION_MS": "6000"}  # a dead member's partitions move on within seconds
    orchestrators = [world.orchestrator(**fast), world.orchestrator(**fast)]
    await asyncio.gather(*(o.ready() for o in orchestrators))
    await world.up(orchestrators=0, workers=2)
    ids = await start_load(world, 400)
    canceller = asyncio.get_running_loop().create_task(cancel_holds(world, ids))
    for _ in range(6):
        await asyncio.sleep(rng.uniform(1.0, 2.5))
        victim = orchestrators.pop(rng.randrange(len(orchestrators)))
        victim.kill9()
        orchestrators.append(world.orchestrator(**fast))
    await asyncio.gather(*(o.ready() for o in orchestrators))
    await canceller
    report = await world.verify(ids)
    assert sum(report.states.values()) == 400
