"""A user's own IWorkflowDefinition, run end to end on each backend."""

from __future__ import annotations

from orchestrator_kafka.context import SagaContext
from orchestrator_kafka.workflow import IWorkflowDefinition, WorkflowStep

from ..conftest import Backend
from .harness import Harness, ok

RESERVE = WorkflowStep("reserve", "d_reserve", compensation="d_release")
PAY = WorkflowStep("pay", "d_pay")
INVOICE = WorkflowStep("invoice", "d_invoice")


class Checkout(IWorkflowDefinition):
    """reserve, then pay, then an invoice only for business customers."""

    def get_id(self) -> str:
        return "checkout"

    def get_steps(self) -> list[WorkflowStep]:
        return [RESERVE, PAY, INVOICE]

    def get_initial_step(self) -> WorkflowStep | None:
        return RESERVE

    def get_next_step(self, current_step: str, context: SagaContext) -> WorkflowStep | None:
        if current_step == "reserve":
            return PAY
        if current_step == "pay" and context.get("business"):
            return INVOICE
        return None


async def test_the_orchestrator_runs_a_users_own_definition(backend: Backend) -> None:
    handlers = {
        "d_reserve": ok({"reserved": True}),
        "d_release": ok({}),
        "d_pay": ok({"paid": 5}),
        "d_invoice": ok({"invoice": "I-1"}),
    }
    async with Harness(backend, [Checkout()], handlers) as h:
        business = await h.orchestrator.execute_workflow("checkout", {"business": True})
        private = await h.orchestrator.execute_workflow("checkout", {})
        done = await h.wait_final(business)
        plain = await h.wait_final(private)
    assert done["state"] == "completed" and set(done["step_results"]) == {"reserve", "pay", "invoice"}
    assert plain["state"] == "completed" and set(plain["step_results"]) == {"reserve", "pay"}
    assert plain["steps"]["invoice"] == "skipped"
    assert h.executed(private) == [("reserve", 1), ("pay", 1)]
