"""Workers that never stall (issue 11): each command runs as soon as a slot is free, whatever is slow beside
it; the slots are a limit; plain handlers get threads of the worker's own; a handler past its timeout is
answered at once; partitions revoked mid-handler are drained. On each backend, through an orchestrator.

No test here measures a duration: each makes the old behaviour (a fetched batch awaited whole, plain
handlers on the loop's default pool) wait forever or break a barrier, and the new one finish."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import pytest

from orchestrator_kafka import Orchestrator, StepContext, Worker, WorkflowBuilder
from orchestrator_kafka.codec import decode
from orchestrator_kafka.models import StepResult
from orchestrator_kafka.ports import IWorkflowDefinition

from ..conftest import Backend
from .harness import FINAL
from .test_messaging import Tap

NO_RETRY = {"max_retries": 0, "initial_delay": 0.01, "max_delay": 0.01}


def one_step(workflow_id: str, worker: str, timeout: float | None = None) -> IWorkflowDefinition:
    builder = WorkflowBuilder(workflow_id).add_step("s", worker, timeout=timeout)
    return builder.with_retry_config(**NO_RETRY).build()


@contextlib.asynccontextmanager
async def running(
    backend: Backend,
    workflows: Sequence[IWorkflowDefinition],
    handlers: Mapping[str, Callable[[StepContext], Any]],
    **worker_options: Any,
) -> AsyncIterator[tuple[Orchestrator, Worker]]:
    """An orchestrator and a worker running the handlers as they are (plain functions stay plain)."""
    orchestrator = Orchestrator(list(workflows), backend.bus(), backend.store)
    worker = Worker(backend.bus(), **worker_options)
    for name, fn in handlers.items():
        worker.register(name, fn)
    await orchestrator.start()
    await worker.start()
    try:
        yield orchestrator, worker
    finally:
        await worker.stop()
        await orchestrator.stop()


async def final(orchestrator: Orchestrator, tx: str, timeout: float = 60) -> dict[str, Any]:
    async def poll() -> dict[str, Any]:
        while True:
            status = await orchestrator.get_status(tx)
            if status["state"] in FINAL:
                return status
            await asyncio.sleep(0.02)

    return await asyncio.wait_for(poll(), timeout)


async def until(condition: Callable[[], bool], timeout: float = 60) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)


async def test_a_slow_handler_does_not_delay_the_commands_beside_it(backend: Backend) -> None:
    """The slow step waits until the ten fast sagas started after it have completed: a worker that awaited
    its fetched batch whole would never finish them (the test times out)."""
    release = asyncio.Event()
    started: list[str] = []

    async def step(ctx: StepContext) -> dict[str, Any]:
        started.append(ctx.transaction_id)
        if ctx.get("slow"):
            await release.wait()
        else:
            await asyncio.sleep(0.01)
        return {}

    async with running(backend, [one_step("slots_slow", "slots_step")], {"slots_step": step}) as (o, _):
        try:
            slow = await o.execute_workflow("slots_slow", {"slow": True})
            await until(lambda: slow in started)
            fast = [await o.execute_workflow("slots_slow", {}) for _ in range(10)]
            for tx in fast:
                assert (await final(o, tx))["state"] == "completed"
            assert (await o.get_status(slow))["state"] == "running"
        finally:
            release.set()
        assert (await final(o, slow))["state"] == "completed"


async def test_commands_arriving_while_others_run_start_at_once(backend: Backend) -> None:
    """Twenty sagas started 50 ms apart; each step returns only once all twenty run at the same time. A
    worker that stopped fetching while a batch ran would fail them (the wait below times out)."""
    n = 20
    running_now = 0
    all_in = asyncio.Event()

    async def step(ctx: StepContext) -> dict[str, Any]:
        nonlocal running_now
        running_now += 1
        if running_now == n:
            all_in.set()
        await asyncio.wait_for(all_in.wait(), 60)
        return {}

    async with running(backend, [one_step("slots_stagger", "slots_together")], {"slots_together": step}) as (
        o,
        _,
    ):
        txs = []
        for _ in range(n):
            txs.append(await o.execute_workflow("slots_stagger", {}))
            await asyncio.sleep(0.05)
        states = [(await final(o, tx, 90))["state"] for tx in txs]
    assert states == ["completed"] * n


async def test_at_most_concurrency_handlers_run_at_once(backend: Backend) -> None:
    concurrency, n = 3, 12
    running_now = peak = 0
    full = asyncio.Event()

    async def step(ctx: StepContext) -> dict[str, Any]:
        nonlocal running_now, peak
        running_now += 1
        peak = max(peak, running_now)
        if running_now == concurrency:
            full.set()
        await asyncio.wait_for(full.wait(), 60)
        await asyncio.sleep(0.02)  # room for one more to start, if the limit let it
        running_now -= 1
        return {}

    async with running(
        backend, [one_step("slots_limit", "slots_limited")], {"slots_limited": step}, concurrency=concurrency
    ) as (o, _):
        txs = [await o.execute_workflow("slots_limit", {}) for _ in range(n)]
        states = [(await final(o, tx))["state"] for tx in txs]
    assert states == ["completed"] * n
    assert peak == concurrency


async def test_plain_handlers_do_not_share_the_loops_default_threads(backend: Backend) -> None:
    """Twenty-four plain handlers blocking at once: each must have a thread (a barrier of 24 breaks
    otherwise, failing its step), more than the event loop's default pool gives on a small machine."""
    n = 24
    barrier = threading.Barrier(n, timeout=30)

    def step(ctx: StepContext) -> dict[str, Any]:
        barrier.wait()
        return {"thread": threading.current_thread().name}

    async with running(backend, [one_step("slots_sync", "slots_plain")], {"slots_plain": step}) as (o, _):
        txs = [await o.execute_workflow("slots_sync", {}) for _ in range(n)]
        statuses = [await final(o, tx) for tx in txs]
    assert [s["state"] for s in statuses] == ["completed"] * n, statuses[0]["error"]
    assert all(s["step_results"]["s"]["thread"].startswith("saga-worker") for s in statuses)


async def test_a_plain_handler_past_its_timeout_is_answered_at_once_and_keeps_its_slot(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="orchestrator_kafka.worker")
    gate = threading.Event()
    ran: list[str] = []

    def step(ctx: StepContext) -> dict[str, Any]:
        ran.append(ctx.transaction_id)
        if ctx.get("block"):
            gate.wait(60)  # a thread cannot be stopped: this one outlives its 0.5 s timeout
        return {}

    workflow = one_step("slots_block", "slots_blocker", timeout=0.5)
    patient = one_step("slots_wait", "slots_blocker")  # no timeout: it waits for the slot
    async with running(backend, [workflow, patient], {"slots_blocker": step}, concurrency=1) as (o, _):
        try:
            tap = await Tap().attach(o.event_bus, [o.topics.results])
            blocked = await o.execute_workflow("slots_block", {"block": True})
            replies = await tap.wait_for(1, 60)
            result = decode(replies[0].value)
            assert isinstance(result, StepResult) and result.body.error is not None
            # The worker's own answer, while the thread still blocks.
            assert result.body.error.message == "handler timed out after 0.5s"
            assert not gate.is_set()
            assert "keeps its slot until it returns" in caplog.text
            # Its one slot stays taken: the next command waits for the thread.
            second = await o.execute_workflow("slots_wait", {})
            await asyncio.sleep(0.5)
            assert ran == [blocked]
        finally:
            gate.set()
        assert (await final(o, second))["state"] == "completed"
        assert (await final(o, blocked))["state"] == "compensated"
        await until(lambda: "returned" in caplog.text)


@pytest.mark.parametrize("grace", [30.0, 0.3])
async def test_a_partition_revoked_mid_handler(
    backend: Backend, caplog: pytest.LogCaptureFixture, grace: float
) -> None:
    """A second worker joins the group while the first runs a handler. With time to spare, the handler
    finishes, its result is published and committed before the partitions move: it ran once. Past the
    grace period it is cancelled, logged, and delivered again: it runs again, and the saga completes."""
    caplog.set_level(logging.INFO)
    release = asyncio.Event()
    calls: list[str] = []

    async def step(ctx: StepContext) -> dict[str, Any]:
        calls.append(ctx.command_id)
        await release.wait()
        return {}

    workflow = one_step("slots_revoke", "slots_revoked")
    handlers = {"slots_revoked": step}
    async with running(backend, [workflow], handlers, grace=grace) as (o, _):
        tx = await o.execute_workflow("slots_revoke", {})
        await until(lambda: len(calls) == 1)
        second = Worker(backend.bus(), grace=grace)
        second.register("slots_revoked", step)
        joining = asyncio.create_task(second.start())
        try:
            # The first worker is draining its released partitions (the rebalance waits for it).
            await until(lambda: "released partitions" in caplog.text)
            if grace < 1:
                await until(lambda: "to be delivered again" in caplog.text)  # the bus's line
                await until(lambda: f"{calls[0]} of {tx} cancelled" in caplog.text)  # the worker's
            release.set()
            await joining
            assert (await final(o, tx))["state"] == "completed"
        finally:
            release.set()
            await second.stop()
    if grace < 1:
        assert calls == [calls[0], calls[0]]  # run again after the cancellation
    else:
        assert calls == [calls[0]]  # finished and committed before the partition moved
