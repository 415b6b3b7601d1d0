"""Bounded, quiet teardown of aiokafka clients: closing one never hangs and never hides the error that
made the bus close it."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka.errors import KafkaError

__all__ = ["quietly"]

_log = logging.getLogger("orchestrator_kafka.kafka")


async def quietly(what: str, awaitable: Any, limit: float) -> None:
    """Await ``awaitable`` (a close or stop named ``what``) for at most ``limit`` seconds, logging instead
    of raising when it times out or fails."""
    # Tearing down must not mask the error that caused it, nor stop the rest of the teardown, nor hang.
    try:
        async with asyncio.timeout(limit):
            await awaitable
    except TimeoutError:
        _log.warning("%s did not finish within %gs; abandoned", what, limit)
    except (KafkaError, OSError, RuntimeError) as exc:
        _log.warning("%s failed: %r", what, exc)
