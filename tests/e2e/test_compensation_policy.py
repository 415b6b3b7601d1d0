"""A compensation's own timeout and retry policy, end to end on each backend."""

from __future__ import annotations

import asyncio

from orchestrator_kafka import NonRetryableError, RetryPolicy, StepContext, WorkflowBuilder

from ..conftest import Backend
from .harness import Harness, ok

FAST = RetryPolicy(max_retries=2, initial_delay=0.01, backoff_factor=1.0, max_delay=0.01)


async def test_a_hung_compensation_times_out_on_its_own_timeout_and_is_retried(backend: Backend) -> None:
    # The step has no timeout, so without a compensation_timeout the hung compensation would hold the
    # saga compensating for ever.
    workflow = (
        WorkflowBuilder("undo")
        .add_step("a", "u_a", "u_undo_a", compensation_timeout=0.5, compensation_retry=FAST)
        .add_step("b", "u_b")
        .build()
    )
    calls = 0

    async def undo(ctx: StepContext) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(5)  # hangs past the compensation's timeout

    async def fail(ctx: StepContext) -> None:
        raise NonRetryableError("out of stock")

    handlers = {"u_a": ok({"a": 1}), "u_b": fail, "u_undo_a": undo}
    async with Harness(backend, [workflow], handlers, worker_options={"grace": 0.1}) as h:
        tx = await h.orchestrator.execute_workflow("undo", {})
        status = await h.wait_final(tx, timeout=20)
    assert status["state"] == "compensated" and status["steps"]["a"] == "compensated"
    assert calls >= 2
    assert [c.attempt for c in h.calls if c.transaction_id == tx and c.compensation][:2] == [1, 2]
