"""A shop's order service: publishes start events for new orders, as any service would.

``python -m orchestrator_kafka.examples.order_service --orders 6`` puts six orders on the start topic of
the Kafka at ``KAFKA_BOOTSTRAP_SERVERS`` and exits; the orchestrator (``orchestrator-kafka run``) takes
them from there. Every third order ships to ``"nowhere"``, so its saga compensates.
"""

from __future__ import annotations

import argparse
import asyncio

from ..client import SagaClient
from ..settings import Settings


def order(n: int) -> dict[str, object]:
    """The context of order ``n``: every other one premium, every third undeliverable."""
    return {
        "order_id": f"A{n:04d}",
        "amount": 20 + n,
        "customer_tier": "premium" if n % 2 else "basic",
        "address": "nowhere" if n % 3 == 0 else "Oslo",
    }


async def publish_orders(count: int, first: int = 1) -> list[str]:
    """Publish ``count`` start requests, ``order-<n>``, and return their transaction ids."""
    settings = Settings.from_env()
    bus = settings.event_bus()
    await bus.start()
    try:
        client = SagaClient(bus)
        return [
            await client.start_saga("order_processing", order(n), transaction_id=f"order-{n}")
            for n in range(first, first + count)
        ]
    finally:
        await bus.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--orders", type=int, default=6, help="How many orders to place.")
    parser.add_argument("--first", type=int, default=1, help="The number of the first order.")
    args = parser.parse_args()
    for tx in asyncio.run(publish_orders(args.orders, args.first)):
        print(f"order service: placed {tx}")


if __name__ == "__main__":
    main()
