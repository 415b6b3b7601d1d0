"""An operator's repairs through SagaClient, on both backends: each a request on the start topic that the
orchestrator decides, applies once and audits."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from orchestrator_kafka import NonRetryableError, SagaClient, StepContext, WorkflowBuilder
from orchestrator_kafka.codec import encode
from orchestrator_kafka.errors import ValidationError, WorkflowExecutionError
from orchestrator_kafka.models import RepairBody, RepairSaga, SagaEvent
from orchestrator_kafka.ports import OutboxMessage

from ..conftest import Backend
from .harness import Harness, ok, settle


def two_steps() -> Any:
    return (
        WorkflowBuilder("repairable")
        .add_step("a", "rep_a", compensation="rep_undo_a")
        .add_step("b", "rep_b", compensation="rep_undo_b")
        .with_retry_config(max_retries=0, initial_delay=0.01)
        .build()
    )


class Gate:
    """A compensation that fails, for good, until it is mended."""

    def __init__(self) -> None:
        self.mended = False

    async def __call__(self, ctx: StepContext) -> dict[str, Any]:
        if not self.mended:
            raise NonRetryableError("the refund service is down")
        return {}


def fail(message: str) -> Any:
    async def handler(ctx: StepContext) -> dict[str, Any]:
        raise NonRetryableError(message)

    return handler


async def audit_actions(h: Harness, tx: str, version: int) -> list[str]:
    """The actions of every transition of ``tx`` up to ``version``, read from the audit topic."""
    found: dict[int, list[str]] = {}
    async with asyncio.timeout(30):
        while len(found) < version:
            found.clear()
            async for message in h.orchestrator.event_bus.read(h.orchestrator.topics.events):
                event = SagaEvent.model_validate_json(message.value or b"")
                if event.transaction_id == tx:
                    found[event.body.version] = [a.action.value for a in event.body.actions]
            await asyncio.sleep(0.05)
    return [action for v in sorted(found) for action in found[v]]


async def test_retry_runs_a_failed_saga_s_compensation_again_and_finishes_its_rollback(
    backend: Backend,
) -> None:
    undo_b = Gate()
    handlers = {"rep_a": ok(), "rep_b": fail("card declined"), "rep_undo_a": ok(), "rep_undo_b": undo_b}
    async with Harness(backend, [two_steps()], handlers) as h:
        client = SagaClient(h.orchestrator.event_bus, h.orchestrator.state_store)
        tx = await h.orchestrator.execute_workflow("repairable", {})
        failed = await h.wait_final(tx)
        assert failed["state"] == "failed" and "the refund service is down" in failed["error"]
        assert h.compensations(tx) == ["rep_undo_b"]  # the rollback stopped there

        # Retried while the refund service is still down: it fails again, and can be retried again.
        await client.retry(tx, reason="first try")
        async with asyncio.timeout(30):
            while True:
                again = await h.orchestrator.get_status(tx)
                if h.compensations(tx) == ["rep_undo_b", "rep_undo_b"] and again["state"] == "failed":
                    break
                await asyncio.sleep(0.02)
        assert again["steps"]["b"] == "compensation_failed"

        undo_b.mended = True
        request = await client.retry(tx, reason="refunds are back", request_id=f"retry-{uuid.uuid4()}")
        # The same request again, as a client whose publish timed out sends it: applied once.
        duplicate = RepairSaga(
            event_id=request,
            transaction_id=tx,
            workflow_id="repairable",
            occurred_at=datetime.now(UTC),
            body=RepairBody(action="retry", reason="refunds are back"),
        )
        await h.orchestrator.event_bus.publish(
            [OutboxMessage(h.orchestrator.topics.start, tx, encode(duplicate))]
        )
        done = await h.wait_state(tx, {"compensated"})
        await settle()
        assert done["steps"] == {"a": "compensated", "b": "compensated"}
        assert h.compensations(tx) == ["rep_undo_b", "rep_undo_b", "rep_undo_b", "rep_undo_a"]
        assert (await h.orchestrator.get_status(tx))["version"] == done["version"]
        actions = await audit_actions(h, tx, done["version"])
        assert actions.count("retry_requested") == 2 and actions[-1] == "saga_compensated"

        with pytest.raises(WorkflowExecutionError, match="has no failed compensation"):
            await client.retry(tx)


async def test_skip_counts_a_failed_compensation_done_by_hand_and_the_rollback_goes_on(
    backend: Backend,
) -> None:
    handlers = {"rep_a": ok(), "rep_b": fail("card declined"), "rep_undo_a": ok(), "rep_undo_b": Gate()}
    async with Harness(backend, [two_steps()], handlers) as h:
        client = SagaClient(h.orchestrator.event_bus, h.orchestrator.state_store)
        tx = await h.orchestrator.execute_workflow("repairable", {})
        assert (await h.wait_final(tx))["state"] == "failed"
        with pytest.raises(WorkflowExecutionError, match="step 'a' has no compensation failed"):
            await client.skip_compensation(tx, "a", "nothing to undo")
        with pytest.raises(ValidationError, match="at most 1000 characters"):
            await client.skip_compensation(tx, "b", "x" * 1001)
        await client.skip_compensation(tx, "b", "refunded by hand, ticket OPS-1")
        done = await h.wait_state(tx, {"compensated"})
        assert done["steps"] == {"a": "compensated", "b": "compensated"}
        assert h.compensations(tx) == ["rep_undo_b", "rep_undo_a"]  # b's is not run again
        assert "compensation_skipped" in await audit_actions(h, tx, done["version"])


async def test_force_cancel_frees_a_saga_stuck_waiting_for_a_parallel_step_whose_worker_is_gone(
    backend: Backend,
) -> None:
    gone = asyncio.Event()

    async def never_answers(ctx: StepContext) -> dict[str, Any]:
        await gone.wait()
        raise NonRetryableError("too late")

    workflow = (
        WorkflowBuilder("stuck")
        .add_step("a", "rep_a", compensation="rep_undo_a")
        .add_parallel_steps(
            [
                {"name": "p", "worker_name": "rep_hang", "compensation": "rep_undo_p"},
                {"name": "q", "worker_name": "rep_b", "compensation": "rep_undo_q"},
            ]
        )
        .with_retry_config(max_retries=0, initial_delay=0.01)
        .build()
    )
    handlers = {
        "rep_a": ok(),
        "rep_hang": never_answers,
        "rep_b": fail("out of stock"),
        "rep_undo_a": ok(),
        "rep_undo_p": ok(),
        "rep_undo_q": ok(),
    }
    async with Harness(backend, [workflow], handlers) as h:
        client = SagaClient(h.orchestrator.event_bus, h.orchestrator.state_store)
        tx = await h.orchestrator.execute_workflow("stuck", {})
        await h.wait_state(tx, {"compensating"})
        await settle()
        assert (await h.orchestrator.get_status(tx))["state"] == "compensating"  # waiting on p for ever
        with pytest.raises(WorkflowExecutionError, match="compensating"):
            await client.cancel_saga(tx)

        await client.force_cancel(tx, "rep_hang's service was decommissioned")
        done = await h.wait_final(tx)
        assert done["state"] == "cancelled" and done["error"] == "rep_hang's service was decommissioned"
        assert sorted(h.compensations(tx)[:2]) == ["rep_undo_p", "rep_undo_q"]
        assert h.compensations(tx)[2:] == ["rep_undo_a"]
        with pytest.raises(WorkflowExecutionError, match="cannot be force-cancelled"):
            await client.force_cancel(tx)
        gone.set()  # the hung call ends; its late failure changes nothing
        await settle()
        assert (await h.orchestrator.get_status(tx))["state"] == "cancelled"
