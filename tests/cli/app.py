"""A user's module for the CLI tests: ``--workflows tests.cli.app`` and ``--handlers tests.cli.app``."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from orchestrator_kafka import NonRetryableError, StepContext, WorkflowBuilder

workflows = [
    WorkflowBuilder("payment")
    .add_step("hold", "cli_hold", compensation="cli_release")
    .add_step("settle", "cli_settle")
    .with_retry_config(max_retries=0, initial_delay=0.01)
    .build()
]


async def hold(ctx: StepContext) -> dict[str, Any]:
    if ctx.get("slow"):
        await asyncio.sleep(5)  # long enough to be cancelled meanwhile
    return {"held": ctx.get("amount")}


async def settle(ctx: StepContext) -> dict[str, Any]:
    if ctx.get("amount", 0) > 100:
        raise NonRetryableError("amount over the limit")
    return {"settled": True}


def release(ctx: StepContext) -> dict[str, Any]:
    gate = ctx.get("release_gate")
    if gate and not Path(gate).exists():  # the repair tests' compensation that fails until mended
        raise NonRetryableError("the release service is down")
    return {"released": True}


handlers = {"cli_hold": hold, "cli_settle": settle, "cli_release": release}
