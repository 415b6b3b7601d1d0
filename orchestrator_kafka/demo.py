"""The demo: the API reference's order processing, end to end in one process on the in-memory backend.

One order completes (a premium customer, so the conditional step runs); one fails at shipping, so the
saga compensates ``cancel_shipment -> refund_payment -> release_inventory``. Every transition is printed
as the orchestrator publishes it to the audit topic.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from rich.console import Console

from . import codec
from .backends.memory import InMemoryEventBus, InMemoryStateStore
from .examples import orders
from .models import SagaEvent
from .orchestrator import Orchestrator
from .ports import InboundMessage
from .render import STATE_STYLE, describe
from .worker import Worker


def order_worker(bus: InMemoryEventBus) -> Worker:
    """A worker serving every step and compensation of the order workflow."""
    worker = Worker(bus)
    for name, fn in orders.handlers.items():
        worker.register(name, fn)
    return worker


async def run_demo(console: Console | None = None, *, deadline: float = 30.0) -> dict[str, dict[str, Any]]:
    """Run two orders to their end and return their final statuses, by transaction id."""
    console = console or Console(highlight=False, soft_wrap=True)
    bus, store = InMemoryEventBus(), InMemoryStateStore()
    orchestrator = Orchestrator(orders.workflows, bus, store)
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
        contexts = {
            "order-1": {"order_id": "A100", "amount": 120, "customer_tier": "premium", "address": "Oslo"},
            "order-2": {"order_id": "A200", "amount": 80, "customer_tier": "basic", "address": "nowhere"},
        }
        for tx, context in contexts.items():
            await orchestrator.execute_workflow("order_processing", context, transaction_id=tx)
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in finished.values())), deadline)
        await tail.stop()
        statuses = {tx: await orchestrator.get_status(tx) for tx in contexts}
    console.print()
    for tx, status in statuses.items():
        style = STATE_STYLE.get(status["state"], "white")
        console.print(f"[bold]{tx}[/bold]: [{style}]{status['state']}[/]  error={status['error']!r}")
        console.print(f"   step results: {status['step_results']}")
        if compensations[tx]:
            console.print(f"   compensations, in order: {' -> '.join(compensations[tx])}")
    return statuses


def main() -> None:
    """Run the demo on a fresh event loop."""
    asyncio.run(run_demo())
