"""The API reference's order processing, as a module the CLI can serve.

``orchestrator-kafka run --workflows orchestrator_kafka.examples.orders`` runs its orchestrator and
``orchestrator-kafka worker --handlers orchestrator_kafka.examples.orders`` its workers. An order whose
``address`` is ``"nowhere"`` fails at shipping, so its saga compensates
``cancel_shipment -> refund_payment -> release_inventory``.
"""

from __future__ import annotations

from typing import Any

from ..errors import NonRetryableError
from ..worker import Handler, StepContext
from ..workflow import WorkflowBuilder, WorkflowDefinition


def order_workflow() -> WorkflowDefinition:
    """Parallel checks, reserve, charge, a premium-only step, ship; retries with backoff."""
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


async def check_inventory(ctx: StepContext) -> dict[str, Any]:
    return {"in_stock": True}


async def validate_payment(ctx: StepContext) -> dict[str, Any]:
    return {"card_ok": True}


async def reserve(ctx: StepContext) -> dict[str, Any]:
    return {"reservation_id": f"R-{ctx.get('order_id')}"}


async def charge(ctx: StepContext) -> dict[str, Any]:
    return {"payment_id": f"P-{ctx.get('order_id')}", "amount": ctx.get("amount")}


async def premium(ctx: StepContext) -> dict[str, Any]:
    return {"gift_wrap": True}


async def ship(ctx: StepContext) -> dict[str, Any]:
    if ctx.get("address") == "nowhere":
        raise NonRetryableError("the carrier cannot deliver to 'nowhere'")
    return {"tracking": f"T-{ctx.get('order_id')}"}


def _undo(what: str) -> Handler:
    async def handler(ctx: StepContext) -> dict[str, Any]:
        return {"undone": what}

    return handler


workflows = [order_workflow()]
"""The workflows ``orchestrator-kafka run`` serves from this module."""

handlers: dict[str, Handler] = {
    "inventory_check": check_inventory,
    "payment_validator": validate_payment,
    "reserve_inventory": reserve,
    "charge_payment": charge,
    "premium_handler": premium,
    "ship_order": ship,
    **{name: _undo(name) for name in ("release_inventory", "refund_payment", "cancel_shipment")},
}
"""Every step and compensation of :func:`order_workflow`, by worker name."""
