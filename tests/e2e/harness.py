"""A running orchestrator and worker on one backend, with a log of every handler call."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator_kafka import Orchestrator, StepContext, Worker
from orchestrator_kafka.ports import IWorkflowDefinition

from ..conftest import Backend

FINAL = {"completed", "compensated", "failed", "cancelled"}
Handler = Callable[[StepContext], Any]


@dataclass(frozen=True)
class Call:
    worker: str
    transaction_id: str
    step: str
    attempt: int
    compensation: bool


@dataclass
class Harness:
    backend: Backend
    workflows: Sequence[IWorkflowDefinition]
    handlers: Mapping[str, Handler]
    orchestrator_options: dict[str, Any] = field(default_factory=dict)
    worker_options: dict[str, Any] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)

    async def __aenter__(self) -> Harness:
        self.orchestrator = Orchestrator(
            list(self.workflows), self.backend.bus(), self.backend.store, **self.orchestrator_options
        )
        self.worker = Worker(self.backend.bus(), **self.worker_options)
        for name, fn in self.handlers.items():
            self.worker.register(name, self._recording(name, fn))
        await self.orchestrator.start()
        await self.worker.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.worker.stop()
        await self.orchestrator.stop()

    def _recording(self, name: str, fn: Handler) -> Handler:
        async def handler(ctx: StepContext) -> dict[str, Any] | None:
            self.calls.append(Call(name, ctx.transaction_id, ctx.step, ctx.attempt, ctx.is_compensation))
            outcome = fn(ctx)
            return await outcome if inspect.isawaitable(outcome) else outcome

        return handler

    async def wait_final(self, tx: str, timeout: float = 30.0) -> dict[str, Any]:
        return await self.wait_state(tx, FINAL, timeout)

    async def wait_state(self, tx: str, states: set[str], timeout: float = 30.0) -> dict[str, Any]:
        async def poll() -> dict[str, Any]:
            while True:
                try:
                    status = await self.orchestrator.get_status(tx)
                except ValueError:  # started through the start topic, not recorded yet
                    status = {"state": None}
                if status["state"] in states:
                    return status
                await asyncio.sleep(0.02)

        return await asyncio.wait_for(poll(), timeout)

    def compensations(self, tx: str) -> list[str]:
        return [c.worker for c in self.calls if c.transaction_id == tx and c.compensation]

    def executed(self, tx: str) -> list[tuple[str, int]]:
        return [(c.step, c.attempt) for c in self.calls if c.transaction_id == tx and not c.compensation]


def ok(result: dict[str, Any] | None = None) -> Handler:
    async def handler(ctx: StepContext) -> dict[str, Any] | None:
        return result

    return handler


async def settle(seconds: float = 0.3) -> None:
    """Give late messages time to arrive, for tests asserting that nothing more happens."""
    await asyncio.sleep(seconds)
