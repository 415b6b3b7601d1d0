"""The demo: the API reference's order processing, end to end in one process on the in-memory backend.

One order completes (a premium customer, so the conditional step runs); one fails at shipping, so the
saga compensates ``cancel_shipment -> refund_payment -> release_inventory``. Every transition is printed
as the orchestrator publishes it to the audit topic.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console

from . import codec
from .backends.memory import InMemoryEventBus, InMemoryStateStore
from .errors import NonRetryableError
from .models import SagaEvent
from .orchestrator import Orchestrator
from .ports import InboundMessage
from .worker import StepContext, Worker
from .workflow import WorkflowBuilder, WorkflowDefinition

_STATE_STYLE = {
    "pending": "white",
    "running": "cyan",
    "compensating": "yellow",
    "completed": "bold green",
    "compensated": "bold yellow",
    "failed": "bold red",
    "cancelled": "magenta",
}


def order_workflow() -> WorkflowDefinition:
    """The spec's order processing: parallel checks, reserve, charge, a premium step, ship."""
    return (
        WorkflowBuilder("order_processing")
        .add_parallel_steps(
            [
                {"name": "check_inventory", "worker_name": "inventory_check"},
                {"name": "validate_payment", "worker_name": "payment_validator"},
            ]
        )
        .add_step("reserve", "reserve_inventory", compensation="release_inventory")
        .add_step("charge", "charge_payment", compensation="refund_payment")
        .add_conditional_step(
            "premium_processing",
            "premium_handler",
            condition=lambda ctx: ctx.get("customer_tier") == "premium",
        )
        .add_step("ship", "ship_order", compensation="cancel_shipment", timeout=5.0)
        .with_retry_config(max_retries=2, backoff_factor=2.0, initial_delay=0.05, max_delay=1.0)
        .build()
    )


def order_worker(bus: InMemoryEventBus) -> Worker:
    """The demo's workers: every step and compensation of :func:`order_workflow`."""
    worker = Worker(bus)

    @worker.handler("inventory_check")
    async def check_inventory(ctx: StepContext) -> dict[str, Any]:
        return {"in_stock": True}

    @worker.handler("payment_validator")
    async def validate_payment(ctx: StepContext) -> dict[str, Any]:
        return {"card_ok": True}

    @worker.handler("reserve_inventory")
    async def reserve(ctx: StepContext) -> dict[str, Any]:
        return {"reservation_id": f"R-{ctx.get('order_id')}"}

    @worker.handler("charge_payment")
    async def charge(ctx: StepContext) -> dict[str, Any]:
        return {"payment_id": f"P-{ctx.get('order_id')}", "amount": ctx.get("amount")}

    @worker.handler("premium_handler")
    async def premium(ctx: StepContext) -> dict[str, Any]:
        return {"gift_wrap": True}

    @worker.handler("ship_order")
    async def ship(ctx: StepContext) -> dict[str, Any]:
        if ctx.get("address") == "nowhere":
            raise NonRetryableError("the carrier cannot deliver to 'nowhere'")
        return {"tracking": f"T-{ctx.get('order_id')}"}

    def undo(what: str) -> Callable[[StepContext], Any]:
        async def handler(ctx: StepContext) -> dict[str, Any]:
            return {"undone": what}

        return handler

    for name in ("release_inventory", "refund_payment", "cancel_shipment"):
        worker.register(name, undo(name))
    return worker


def describe(event: SagaEvent) -> list[str]:
    """Readable lines for an audit event: one per action of the transition."""
    lines = []
    for a in event.body.actions:
        style = _STATE_STYLE.get(a.state, "white")
        what = a.action.replace("_", " ")
        step = f" [bold]{a.step}[/bold]" if a.step else ""
        if a.worker_name and a.kind == "compensate":
            step += f" -> {a.worker_name}"
        attempt = f" (attempt {a.attempt})" if a.attempt and a.attempt > 1 else ""
        state = f"  [{style}]{a.state}[/]" if a.action.startswith(("saga_", "compensation_started")) else ""
        error = f"  [red]{a.error}[/red]" if a.error and a.action != "retry_scheduled" else ""
        lines.append(f"[dim]{event.transaction_id:>10}[/dim]  {what}{step}{attempt}{state}{error}")
    return lines


async def run_demo(console: Console | None = None, *, deadline: float = 30.0) -> dict[str, dict[str, Any]]:
    """Run two orders to their end and return their final statuses, by transaction id."""
    console = console or Console(highlight=False, soft_wrap=True)
    bus, store = InMemoryEventBus(), InMemoryStateStore()
    orchestrator = Orchestrator(order_workflow(), bus, store)
    worker = order_worker(bus)
    finished: dict[str, asyncio.Event] = {"order-1": asyncio.Event(), "order-2": asyncio.Event()}
    compensations: dict[str, list[str]] = {tx: [] for tx in finished}

    async def audit(batch: Sequence[InboundMessage]) -> None:
        for message in batch:
            event = codec.decode(message.value)
            if isinstance(event, SagaEvent):
                for line in describe(event):
                    console.print(line)
                for action in event.body.actions:
                    if action.action == "compensation_dispatched" and action.worker_name:
                        compensations[event.transaction_id].append(action.worker_name)
                if event.body.to_state in ("completed", "compensated", "failed", "cancelled"):
                    finished[event.transaction_id].set()

    async with orchestrator, worker:
        tail = await bus.subscribe([orchestrator.topics.events], "demo.audit", audit)
        console.print("[bold]order-1[/bold]: a premium customer; every step succeeds")
        console.print("[bold]order-2[/bold]: shipping fails, so the saga compensates in reverse\n")
        orders = {
            "order-1": {"order_id": "A100", "amount": 120, "customer_tier": "premium", "address": "Oslo"},
            "order-2": {"order_id": "A200", "amount": 80, "customer_tier": "basic", "address": "nowhere"},
        }
        for tx, context in orders.items():
            await orchestrator.execute_workflow("order_processing", context, transaction_id=tx)
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in finished.values())), deadline)
        await tail.stop()
        statuses = {tx: await orchestrator.get_status(tx) for tx in orders}
    console.print()
    for tx, status in statuses.items():
        style = _STATE_STYLE.get(status["state"], "white")
        console.print(f"[bold]{tx}[/bold]: [{style}]{status['state']}[/]  error={status['error']!r}")
        console.print(f"   step results: {status['step_results']}")
        if compensations[tx]:
            console.print(f"   compensations, in order: {' -> '.join(compensations[tx])}")
    return statuses


def main() -> None:
    """Run the demo on a fresh event loop."""
    asyncio.run(run_demo())
