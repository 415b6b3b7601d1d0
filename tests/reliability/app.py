"""The workflows and handlers the reliability tests run in separate processes.

``--workflows tests.reliability.app`` and ``--handlers tests.reliability.app``. Every handler invocation
is recorded atomically in a Redis that no test restarts (``REL_RECORD_URL``, the shared one), under
``REL_RECORD_PREFIX``:

* ``<p>:runs``  hash command_id -> number of times a handler was invoked for it
* ``<p>:ok``    hash command_id -> 1 once that invocation returned a success

A command id is ``tx:step:kind:attempt``, so "each (saga, step, attempt, execute/compensate) ran in a
handler once" is "every count in ``<p>:runs`` is 1".

What a saga does is chosen by its context's ``plan``:

* ``ok``     every step succeeds: ``completed``
* ``fail``   ``ship`` fails for good: ``charge`` and ``reserve`` are compensated, ``compensated``
* ``flaky``  ``charge`` fails (retryably) on its first attempt, then succeeds: a retry timer, ``completed``
* ``slow``   ``charge``'s first attempt outlives its timeout: a timeout timer, a retry, ``completed``
* ``hold``   ``reserve`` takes a while, so a cancel can land while it runs: ``cancelled`` (or, if the
  cancel comes too late, ``completed``)
* ``stall``  ``reserve``'s first run never returns (a worker must be killed for it to run again);
  ``completed``
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import redis.asyncio as aioredis

from orchestrator_kafka import NonRetryableError, StepContext, WorkflowBuilder

WORKFLOW = "rel"
CHARGE_TIMEOUT = 1.5

workflows = [
    WorkflowBuilder(WORKFLOW)
    .add_step("reserve", "rel_reserve", compensation="rel_release")
    .add_step("charge", "rel_charge", compensation="rel_refund", timeout=CHARGE_TIMEOUT)
    .add_step("ship", "rel_ship")
    .with_retry_config(max_retries=2, initial_delay=0.3, backoff_factor=2.0, max_delay=1.0)
    .build(),
    # For the timeout storm: one step that nobody answers in time, no retries, a compensation.
    WorkflowBuilder("rel_storm")
    .add_step("wait", "rel_void", compensation="rel_undo", timeout=2.0)
    .with_retry_config(max_retries=0, initial_delay=0.1)
    .build(),
]

_client: aioredis.Redis | None = None
_loop: asyncio.AbstractEventLoop | None = None


def _redis() -> aioredis.Redis:
    global _client, _loop
    loop = asyncio.get_running_loop()
    if _client is None or _loop is not loop:
        _client = aioredis.from_url(os.environ["REL_RECORD_URL"])
        _loop = loop
    return _client


def _prefix() -> str:
    return os.environ["REL_RECORD_PREFIX"]


async def _record(ctx: StepContext) -> int:
    """Count the invocation; how many times this command has run, this one included."""
    return int(await _redis().hincrby(f"{_prefix()}:runs", ctx.command_id, 1))


async def _succeeded(ctx: StepContext, result: dict[str, Any]) -> dict[str, Any]:
    await _redis().hset(f"{_prefix()}:ok", ctx.command_id, 1)
    return result


async def reserve(ctx: StepContext) -> dict[str, Any]:
    runs = await _record(ctx)
    if ctx.get("plan") == "hold":
        await asyncio.sleep(1.0)
    if ctx.get("plan") == "stall" and runs == 1:
        await asyncio.Event().wait()
    return await _succeeded(ctx, {"reserved": True})


async def charge(ctx: StepContext) -> dict[str, Any]:
    await _record(ctx)
    plan = ctx.get("plan")
    if plan == "flaky" and ctx.attempt == 1:
        raise RuntimeError("card network hiccup")
    if plan == "slow" and ctx.attempt == 1:
        await asyncio.sleep(CHARGE_TIMEOUT + 1.0)  # the worker cancels it at the timeout
    return await _succeeded(ctx, {"charged": True})


async def ship(ctx: StepContext) -> dict[str, Any]:
    await _record(ctx)
    if ctx.get("plan") == "fail":
        raise NonRetryableError("no courier")
    return await _succeeded(ctx, {"shipped": True})


async def compensate(ctx: StepContext) -> dict[str, Any]:
    await _record(ctx)
    return await _succeeded(ctx, {"undone": ctx.step})


handlers = {
    "rel_reserve": reserve,
    "rel_charge": charge,
    "rel_ship": ship,
    "rel_release": compensate,
    "rel_refund": compensate,
    "rel_undo": compensate,
}
