"""Every behaviour of DESIGN section 4 and every error of the API reference, end to end, on each backend."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from orchestrator_kafka import (
    NonRetryableError,
    Orchestrator,
    RetryPolicy,
    StepContext,
    ValidationError,
    WorkflowBuilder,
    WorkflowExecutionError,
)
from orchestrator_kafka.codec import encode
from orchestrator_kafka.models import ResultBody, StepResult, command_id
from orchestrator_kafka.ports import OutboxMessage
from orchestrator_kafka.workflow import WorkflowDefinition

from ..conftest import Backend
from .harness import Harness, ok, settle

FAST = {"max_retries": 2, "backoff_factor": 2.0, "initial_delay": 0.01, "max_delay": 0.05}


def transaction_workflow() -> WorkflowDefinition:
    return (
        WorkflowBuilder("transaction")
        .add_step("reserve", "reserve_inventory", compensation="release_inventory")
        .add_step("charge", "charge_payment", compensation="refund_payment")
        .add_step("ship", "ship_order", compensation="cancel_shipment")
        .with_retry_config(**FAST)
        .build()
    )


def undo_handlers() -> dict[str, Any]:
    return {name: ok({}) for name in ("release_inventory", "refund_payment", "cancel_shipment")}


async def test_sequential_saga_completes_with_results_and_status(backend: Backend) -> None:
    handlers = {
        "reserve_inventory": ok({"reservation": "R1"}),
        "charge_payment": ok({"payment": "P1"}),
        "ship_order": ok({"tracking": "T1"}),
        **undo_handlers(),
    }
    async with Harness(backend, [transaction_workflow()], handlers) as h:
        tx = await h.orchestrator.execute_workflow("transaction", {"order_id": "O-1"})
        early = await h.orchestrator.get_status(tx)
        assert early["state"] in {"pending", "running", "completed"}
        status = await h.wait_final(tx)
    assert status["state"] == "completed"
    assert status["error"] is None
    assert status["current_step"] is None
    assert status["transaction_id"] == tx and status["workflow_id"] == "transaction"
    assert status["step_results"] == {
        "reserve": {"reservation": "R1"},
        "charge": {"payment": "P1"},
        "ship": {"tracking": "T1"},
    }
    created, updated = (
        datetime.fromisoformat(status["created_at"]),
        datetime.fromisoformat(status["updated_at"]),
    )
    assert created.utcoffset() is not None and created.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert updated >= created
    assert h.executed(tx) == [("reserve", 1), ("charge", 1), ("ship", 1)]
    assert h.compensations(tx) == []


async def test_each_step_sees_the_data_of_the_steps_before_it(backend: Backend) -> None:
    seen: dict[str, dict[str, Any]] = {}

    def remember(result: dict[str, Any]) -> Any:
        async def handler(ctx: StepContext) -> dict[str, Any]:
            seen[ctx.step] = dict(ctx.data)
            return result

        return handler

    handlers = {
        "reserve_inventory": remember({"reservation": "R1"}),
        "charge_payment": remember({"payment": "P1"}),
        "ship_order": remember({}),
        **undo_handlers(),
    }
    async with Harness(backend, [transaction_workflow()], handlers) as h:
        tx = await h.orchestrator.execute_workflow("transaction", {"order_id": "O-1"})
        await h.wait_final(tx)
    assert seen["reserve"] == {"order_id": "O-1"}
    assert seen["charge"] == {"order_id": "O-1", "reservation": "R1"}
    assert seen["ship"] == {"order_id": "O-1", "reservation": "R1", "payment": "P1"}


async def test_failure_compensates_in_reverse_order_as_the_spec_says(backend: Backend) -> None:
    async def ship_fails(ctx: StepContext) -> dict[str, Any]:
        raise NonRetryableError("no carrier")

    handlers = {
        "reserve_inventory": ok({}),
        "charge_payment": ok({}),
        "ship_order": ship_fails,
        **undo_handlers(),
    }
    async with Harness(backend, [transaction_workflow()], handlers) as h:
        tx = await h.orchestrator.execute_workflow("transaction", {})
        status = await h.wait_final(tx)
        await settle()
    assert status["state"] == "compensated"
    assert "ship" in status["error"] and "NonRetryableError: no carrier" in status["error"]
    assert h.compensations(tx) == ["cancel_shipment", "refund_payment", "release_inventory"]
    assert h.executed(tx) == [("reserve", 1), ("charge", 1), ("ship", 1)]  # non-retryable: one attempt


async def test_retryable_failures_are_retried_with_backoff_then_succeed(backend: Backend) -> None:
    attempts: list[float] = []

    async def flaky(ctx: StepContext) -> dict[str, Any]:
        attempts.append(asyncio.get_running_loop().time())
        if ctx.attempt < 3:
            raise ConnectionError(f"attempt {ctx.attempt} failed")
        return {"charged": True}

    workflow = (
        WorkflowBuilder("retrying")
        .add_step("charge", "charge_payment", compensation="refund_payment")
        .with_retry_config(max_retries=3, backoff_factor=2.0, initial_delay=0.05, max_delay=1.0)
        .build()
    )
    async with Harness(backend, [workflow], {"charge_payment": flaky, "refund_payment": ok()}) as h:
        tx = await h.orchestrator.execute_workflow("retrying", {})
        status = await h.wait_final(tx)
    assert status["state"] == "completed"
    assert h.executed(tx) == [("charge", 1), ("charge", 2), ("charge", 3)]
    # The second retry waits twice as long as the first (0.05 s, then 0.1 s), measured loosely.
    assert attempts[1] - attempts[0] >= 0.05
    assert attempts[2] - attempts[1] >= 0.1


async def test_retries_exhausted_compensates_completed_steps(backend: Backend) -> None:
    async def always_fails(ctx: StepContext) -> dict[str, Any]:
        raise RuntimeError("down")

    handlers = {
        "reserve_inventory": ok(),
        "charge_payment": always_fails,
        "ship_order": ok(),
        **undo_handlers(),
    }
    async with Harness(backend, [transaction_workflow()], handlers) as h:
        tx = await h.orchestrator.execute_workflow("transaction", {})
        status = await h.wait_final(tx)
    assert status["state"] == "compensated"
    assert "RuntimeError: down" in status["error"]
    assert h.executed(tx) == [("reserve", 1), ("charge", 1), ("charge", 2), ("charge", 3)]
    assert h.compensations(tx) == ["refund_payment", "release_inventory"]


async def test_step_retry_policy_overrides_the_workflow_default(backend: Backend) -> None:
    async def always_fails(ctx: StepContext) -> dict[str, Any]:
        raise RuntimeError("down")

    workflow = (
        WorkflowBuilder("override")
        .add_step("a", "worker_a", retry=RetryPolicy(max_retries=0, initial_delay=0.01, max_delay=0.01))
        .with_retry_config(**FAST)
        .build()
    )
    async with Harness(backend, [workflow], {"worker_a": always_fails}) as h:
        tx = await h.orchestrator.execute_workflow("override", {})
        status = await h.wait_final(tx)
    assert status["state"] == "compensated"
    assert h.executed(tx) == [("a", 1)]


async def test_conditional_step_runs_only_when_its_condition_holds(backend: Backend) -> None:
    workflow = (
        WorkflowBuilder("conditional")
        .add_step("validate", "validate_order")
        .add_conditional_step(
            "premium", "premium_handler", condition=lambda ctx: ctx.get("customer_tier") == "premium"
        )
        .add_step("fulfill", "fulfill_order")
        .build()
    )
    handlers = {"validate_order": ok(), "premium_handler": ok({"perk": 1}), "fulfill_order": ok()}
    async with Harness(backend, [workflow], handlers) as h:
        premium = await h.orchestrator.execute_workflow("conditional", {"customer_tier": "premium"})
        basic = await h.orchestrator.execute_workflow("conditional", {"customer_tier": "basic"})
        premium_status, basic_status = await h.wait_final(premium), await h.wait_final(basic)
    assert premium_status["state"] == basic_status["state"] == "completed"
    assert [s for s, _ in h.executed(premium)] == ["validate", "premium", "fulfill"]
    assert [s for s, _ in h.executed(basic)] == ["validate", "fulfill"]
    assert "premium" in premium_status["step_results"]
    assert "premium" not in basic_status["step_results"]
    assert basic_status["steps"]["premium"] == "skipped"


async def test_parallel_steps_run_together_and_join(backend: Backend) -> None:
    both_running = asyncio.Event()
    running: set[str] = set()

    def branch(name: str) -> Any:
        async def handler(ctx: StepContext) -> dict[str, Any]:
            running.add(name)
            if running == {"inventory", "payment"}:
                both_running.set()
            # Each branch waits until the other has started too: they must run at the same time.
            await asyncio.wait_for(both_running.wait(), 10)
            return {name: True}

        return handler

    workflow = (
        WorkflowBuilder("parallel")
        .add_parallel_steps(
            [
                {"name": "check_inventory", "worker_name": "inventory_check"},
                {"name": "validate_payment", "worker_name": "payment_validator"},
            ]
        )
        .add_step("fulfill", "fulfill_order")
        .build()
    )
    handlers = {
        "inventory_check": branch("inventory"),
        "payment_validator": branch("payment"),
        "fulfill_order": ok(),
    }
    async with Harness(backend, [workflow], handlers) as h:
        tx = await h.orchestrator.execute_workflow("parallel", {})
        status = await h.wait_final(tx)
    assert status["state"] == "completed"
    assert status["step_results"] == {
        "check_inventory": {"inventory": True},
        "validate_payment": {"payment": True},
        "fulfill": {},
    }
    assert h.executed(tx)[-1] == ("fulfill", 1)


async def test_a_failed_parallel_branch_waits_for_the_other_then_compensates(backend: Backend) -> None:
    release = asyncio.Event()

    async def slow_ok(ctx: StepContext) -> dict[str, Any]:
        await asyncio.wait_for(release.wait(), 10)
        return {}

    async def fails(ctx: StepContext) -> dict[str, Any]:
        release.set()
        raise NonRetryableError("card declined")

    workflow = (
        WorkflowBuilder("parallel_fail")
        .add_step("reserve", "reserve_inventory", compensation="release_inventory")
        .add_parallel_steps(
            [
                {"name": "hold", "worker_name": "hold_stock", "compensation": "unhold_stock"},
                {"name": "authorize", "worker_name": "authorize_card", "compensation": "void_card"},
            ]
        )
        .add_step("ship", "ship_order", compensation="cancel_shipment")
        .with_retry_config(**FAST)
        .build()
    )
    handlers = {
        "reserve_inventory": ok(),
        "hold_stock": slow_ok,
        "authorize_card": fails,
        "ship_order": ok(),
        "release_inventory": ok(),
        "unhold_stock": ok(),
        "void_card": ok(),
        "cancel_shipment": ok(),
    }
    async with Harness(backend, [workflow], handlers) as h:
        tx = await h.orchestrator.execute_workflow("parallel_fail", {})
        status = await h.wait_final(tx)
    assert status["state"] == "compensated"
    assert "card declined" in status["error"]
    # The failed branch's own compensation, then the succeeded branch, then the step before the group.
    assert h.compensations(tx) == ["void_card", "unhold_stock", "release_inventory"]
    assert ("ship", 1) not in h.executed(tx)


async def test_a_step_timeout_counts_as_a_failed_attempt(backend: Backend) -> None:
    async def too_slow(ctx: StepContext) -> dict[str, Any]:
        await asyncio.sleep(2.0)
        return {"late": True}

    workflow = (
        WorkflowBuilder("timeouts")
        .add_step("reserve", "reserve_inventory", compensation="release_inventory")
        .add_step("slow", "slow_worker", timeout=0.3)
        .with_retry_config(max_retries=1, initial_delay=0.01, max_delay=0.01)
        .build()
    )
    handlers = {"reserve_inventory": ok(), "slow_worker": too_slow, "release_inventory": ok()}
    async with Harness(backend, [workflow], handlers) as h:
        tx = await h.orchestrator.execute_workflow("timeouts", {})
        status = await h.wait_final(tx)
    assert status["state"] == "compensated"
    assert "timed out after 0.3s" in status["error"]
    assert h.executed(tx) == [("reserve", 1), ("slow", 1), ("slow", 2)]
    assert h.compensations(tx) == ["release_inventory"]


def late_workflow(max_retries: int) -> WorkflowDefinition:
    return (
        WorkflowBuilder("late")
        .add_step("charge", "charge_payment", compensation="refund_payment", timeout=0.3)
        .with_retry_config(max_retries=max_retries, initial_delay=0.01, max_delay=0.01)
        .build()
    )


async def compensated_then_late(h: Harness) -> str:
    """A saga of :func:`late_workflow` that is compensated, and then gets a late success."""
    tx = await h.orchestrator.execute_workflow("late", {})
    assert (await h.wait_final(tx))["state"] == "compensated"
    await report_a_late_success(h, tx)
    return tx


async def report_a_late_success(h: Harness, tx: str) -> None:
    """Publish what a worker (in any language) answers after the step's attempt 1 timed out, twice."""
    run = (await h.orchestrator.get_status(tx))["run_id"]
    late = StepResult(
        event_id=str(uuid.uuid4()),
        transaction_id=tx,
        workflow_id="late",
        occurred_at=datetime.now(UTC),
        body=ResultBody(
            command_id=command_id(tx, "charge", "execute", 1, run),
            step="charge",
            kind="execute",
            attempt=1,
            status="succeeded",
            result={"charged": True},
        ),
    )
    message = OutboxMessage(h.orchestrator.topics.results, tx, encode(late))
    await h.orchestrator.event_bus.publish([message])
    await h.orchestrator.event_bus.publish([message])  # a duplicate changes nothing more


async def refunds(h: Harness, tx: str, count: int) -> None:
    async def enough() -> None:
        while len(h.compensations(tx)) < count:
            await asyncio.sleep(0.02)

    await asyncio.wait_for(enough(), 20)
    await settle()
    assert h.compensations(tx) == ["refund_payment"] * count


async def test_a_late_success_of_an_abandoned_attempt_is_compensated(backend: Backend) -> None:
    """A worker answers after the step timed out: its effect is undone."""
    async with Harness(backend, [late_workflow(0)], {"refund_payment": ok()}) as h:
        tx = await h.orchestrator.execute_workflow("late", {})
        status = await h.wait_final(tx)
        assert status["state"] == "compensated"
        assert "timed out" in status["error"]
        assert h.compensations(tx) == ["refund_payment"]  # the timed-out step's own compensation
        await report_a_late_success(h, tx)
        await refunds(h, tx, 2)
        assert (await h.orchestrator.get_status(tx))["state"] == "compensated"


async def test_a_failed_compensation_of_a_late_success_is_retried(backend: Backend) -> None:
    async def refund(ctx: StepContext) -> dict[str, Any]:
        if ctx.command_id.endswith(":late-1.1"):
            raise RuntimeError("refund service busy")
        return {}

    async with Harness(backend, [late_workflow(1)], {"refund_payment": refund}) as h:
        tx = await compensated_then_late(h)
        await refunds(h, tx, 3)  # the step's own, the late success's, and its retry
        async with asyncio.timeout(20):
            while (await h.orchestrator.get_status(tx))["late_compensations"]:
                await asyncio.sleep(0.02)  # settled by the retry's success
        assert [c.attempt for c in h.calls if c.transaction_id == tx and c.compensation] == [1, 1, 2]
        assert (await h.orchestrator.get_status(tx))["state"] == "compensated"


async def test_a_late_success_that_cannot_be_undone_fails_the_saga(backend: Backend) -> None:
    async def refund(ctx: StepContext) -> dict[str, Any]:
        if ":late-" in ctx.command_id:
            raise NonRetryableError("card closed")
        return {}

    async with Harness(backend, [late_workflow(1)], {"refund_payment": refund}) as h:
        tx = await compensated_then_late(h)
        status = await h.wait_state(tx, {"failed"})
        assert "the compensation of a late success of step 'charge' failed" in status["error"]
        assert "card closed" in status["error"]
        assert [(c["step"], c["attempt"], c["failed"]) for c in status["late_compensations"]] == [
            ("charge", 1, True)
        ]
        await refunds(h, tx, 2)  # not retried: the error is not retryable


async def test_a_compensation_that_keeps_failing_ends_the_saga_failed(backend: Backend) -> None:
    async def broken_refund(ctx: StepContext) -> dict[str, Any]:
        raise RuntimeError("refund service down")

    async def ship_fails(ctx: StepContext) -> dict[str, Any]:
        raise NonRetryableError("no carrier")

    handlers = {
        "reserve_inventory": ok(),
        "charge_payment": ok(),
        "ship_order": ship_fails,
        "cancel_shipment": ok(),
        "refund_payment": broken_refund,
        "release_inventory": ok(),
    }
    async with Harness(backend, [transaction_workflow()], handlers) as h:
        tx = await h.orchestrator.execute_workflow("transaction", {})
        status = await h.wait_final(tx)
        await settle()
    assert status["state"] == "failed"
    assert "refund service down" in status["error"] and "charge" in status["error"]
    assert h.compensations(tx) == ["cancel_shipment"] + ["refund_payment"] * 3
    assert "release_inventory" not in h.compensations(tx)


async def test_cancel_compensates_in_flight_and_completed_steps(backend: Backend) -> None:
    started = asyncio.Event()

    async def blocks(ctx: StepContext) -> dict[str, Any]:
        started.set()
        await asyncio.sleep(1.0)
        return {}

    handlers = {"reserve_inventory": ok(), "charge_payment": blocks, "ship_order": ok(), **undo_handlers()}
    async with Harness(backend, [transaction_workflow()], handlers) as h:
        tx = await h.orchestrator.execute_workflow("transaction", {})
        await asyncio.wait_for(started.wait(), 20)
        assert await h.orchestrator.cancel_workflow(tx) is True
        status = await h.wait_final(tx)
        with pytest.raises(WorkflowExecutionError, match="cancelled"):
            await h.orchestrator.cancel_workflow(tx)
        await settle(1.2)  # the blocked charge finishes; its success is late and gets compensated too
    assert status["state"] == "cancelled"
    assert status["error"] == "cancelled by request"
    assert h.compensations(tx)[:2] == ["refund_payment", "release_inventory"]
    assert ("ship", 1) not in h.executed(tx)


async def test_cancel_refuses_a_finished_saga_and_an_unknown_id(backend: Backend) -> None:
    handlers = {"reserve_inventory": ok(), "charge_payment": ok(), "ship_order": ok(), **undo_handlers()}
    async with Harness(backend, [transaction_workflow()], handlers) as h:
        tx = await h.orchestrator.execute_workflow("transaction", {})
        await h.wait_final(tx)
        with pytest.raises(WorkflowExecutionError, match="completed"):
            await h.orchestrator.cancel_workflow(tx)
        with pytest.raises(ValueError, match="unknown transaction"):
            await h.orchestrator.cancel_workflow("no-such-saga")
        with pytest.raises(ValueError, match="unknown transaction"):
            await h.orchestrator.get_status("no-such-saga")
        with pytest.raises(ValueError):
            await h.orchestrator.get_status(42)  # type: ignore[arg-type]


async def test_execute_workflow_rejects_bad_input(backend: Backend) -> None:
    async with Harness(backend, [transaction_workflow()], undo_handlers()) as h:
        o = h.orchestrator
        with pytest.raises(ValidationError, match="unknown workflow 'nope'"):
            await o.execute_workflow("nope", {})
        with pytest.raises(ValidationError, match="must be a dict"):
            await o.execute_workflow("transaction", ["not", "a", "dict"])  # type: ignore[arg-type]
        with pytest.raises(ValidationError, match="JSON-serialisable"):
            await o.execute_workflow("transaction", {"when": object()})
        with pytest.raises(ValidationError, match="JSON-serialisable"):
            await o.execute_workflow("transaction", {1: "int key"})  # type: ignore[dict-item]
        with pytest.raises(ValidationError, match="transaction_id"):
            await o.execute_workflow("transaction", {}, transaction_id="")
        assert await backend.store.list_contexts() == []


async def test_a_caller_transaction_id_is_an_idempotency_key(backend: Backend) -> None:
    other = WorkflowBuilder("other").add_step("x", "worker_x").build()
    handlers = {"reserve_inventory": ok(), "charge_payment": ok(), "ship_order": ok(), "worker_x": ok()}
    async with Harness(backend, [transaction_workflow(), other], {**handlers, **undo_handlers()}) as h:
        first = await h.orchestrator.execute_workflow("transaction", {"n": 1}, transaction_id="order-42")
        second = await h.orchestrator.execute_workflow("transaction", {"n": 2}, transaction_id="order-42")
        assert first == second == "order-42"
        status = await h.wait_final("order-42")
        with pytest.raises(WorkflowExecutionError, match="belongs to workflow 'transaction'"):
            await h.orchestrator.execute_workflow("other", {}, transaction_id="order-42")
        await settle()
    assert status["state"] == "completed"
    assert h.executed("order-42") == [("reserve", 1), ("charge", 1), ("ship", 1)]
    assert await backend.store.list_contexts() == ["order-42"]


async def test_the_caller_cannot_change_a_saga_through_its_own_dict(backend: Backend) -> None:
    gate = asyncio.Event()

    async def waits(ctx: StepContext) -> dict[str, Any]:
        await asyncio.wait_for(gate.wait(), 10)
        return {}

    workflow = WorkflowBuilder("isolated").add_step("a", "worker_a").build()
    async with Harness(backend, [workflow], {"worker_a": waits}) as h:
        context = {"items": [1, 2]}
        tx = await h.orchestrator.execute_workflow("isolated", context)
        context["items"].append(3)
        status = await h.orchestrator.get_status(tx)
        status["step_results"]["forged"] = {}
        gate.set()
        final = await h.wait_final(tx)
    saga = await backend.store.load_context(tx)
    assert saga is not None and saga.get("items") == [1, 2]
    assert "forged" not in final["step_results"]


async def test_one_orchestrator_runs_several_workflows_and_lists_them(backend: Backend) -> None:
    a = WorkflowBuilder("wf_a").add_step("a", "worker_a").build()
    b = WorkflowBuilder("wf_b").add_step("b", "worker_b", compensation="undo_b").build()

    async def fails(ctx: StepContext) -> dict[str, Any]:
        raise NonRetryableError("no")

    async with Harness(backend, [a, b], {"worker_a": ok(), "worker_b": fails, "undo_b": ok()}) as h:
        ta = await h.orchestrator.execute_workflow("wf_a", {})
        tb = await h.orchestrator.execute_workflow("wf_b", {})
        assert (await h.wait_final(ta))["state"] == "completed"
        assert (await h.wait_final(tb))["state"] == "compensated"
    store = backend.store
    assert await store.list_contexts(workflow_id="wf_a") == [ta]
    assert await store.list_contexts(state="compensated") == [tb]
    assert await store.list_contexts(workflow_id="wf_a", state="compensated") == []
    assert await store.list_contexts() == sorted([ta, tb])


async def test_public_methods_need_a_started_orchestrator(backend: Backend) -> None:
    orchestrator = Orchestrator(transaction_workflow(), backend.bus(), backend.store)
    with pytest.raises(WorkflowExecutionError, match="not started"):
        await orchestrator.execute_workflow("transaction", {})
    with pytest.raises(ValidationError, match="no steps"):
        WorkflowBuilder("empty").build()
    with pytest.raises(ValidationError, match="two definitions of workflow 'transaction' have version"):
        Orchestrator([transaction_workflow(), transaction_workflow()], backend.bus(), backend.store)
