"""The public surface: what users import from the package root, and the ports' isinstance checks."""

from __future__ import annotations

import logging
import subprocess
import sys

import orchestrator_kafka
from orchestrator_kafka import (
    ConfigurationError,
    IEventBus,
    ILogger,
    InMemoryEventBus,
    InMemoryStateStore,
    IOrchestrator,
    IStateStore,
    IWorkflowDefinition,
    Orchestrator,
    OrchestratorError,
    StateStoreError,
    StoreFullError,
    ValidationError,
    WorkflowBuilder,
    WorkflowExecutionError,
    WorkflowState,
)

EXPECTED = {
    "ConfigurationError",
    "EventBusError",
    "IEventBus",
    "ILogger",
    "IOrchestrator",
    "IStateStore",
    "IWorkflowDefinition",
    "InMemoryEventBus",
    "InMemoryStateStore",
    "KafkaEventBus",
    "NonRetryableError",
    "NotReplicatedError",
    "Orchestrator",
    "OrchestratorError",
    "RedisStateStore",
    "RetryPolicy",
    "SagaClient",
    "SagaContext",
    "StateStoreError",
    "StepContext",
    "StoreFullError",
    "ValidationError",
    "Worker",
    "WorkflowBuilder",
    "WorkflowDefinition",
    "WorkflowExecutionError",
    "WorkflowState",
    "WorkflowStep",
}


def test_all_is_pinned_and_every_name_resolves() -> None:
    assert set(orchestrator_kafka.__all__) == EXPECTED
    for name in orchestrator_kafka.__all__:
        assert getattr(orchestrator_kafka, name) is not None
    from orchestrator_kafka import KafkaEventBus, RedisStateStore

    assert issubclass(KafkaEventBus, IEventBus) and issubclass(RedisStateStore, IStateStore)


def test_ports_work_with_isinstance() -> None:
    workflow = WorkflowBuilder("w").add_step("a", "wa").build()
    bus, store = InMemoryEventBus(), InMemoryStateStore()
    assert isinstance(workflow, IWorkflowDefinition)
    assert isinstance(bus, IEventBus) and isinstance(store, IStateStore)
    assert isinstance(Orchestrator(workflow, bus, store), IOrchestrator)
    assert isinstance(logging.getLogger("x"), ILogger)


def test_errors_form_one_tree() -> None:
    for error in (ValidationError, WorkflowExecutionError, StateStoreError, ConfigurationError):
        assert issubclass(error, OrchestratorError)
    # A full store is a store failure: whoever handles StateStoreError handles it too.
    assert issubclass(StoreFullError, StateStoreError)
    assert issubclass(ValidationError, ValueError)  # a bad argument is a ValueError too
    assert [s.value for s in WorkflowState] == [
        "pending",
        "running",
        "compensating",
        "completed",
        "compensated",
        "failed",
        "cancelled",
    ]


def test_python_dash_m_runs_the_cli() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator_kafka", "--help"], capture_output=True, text=True, check=True
    )
    assert "demo" in out.stdout


def test_the_demo_shows_the_compensations_in_reverse_order() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator_kafka", "demo"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert "order-1: completed" in out.stdout
    assert "order-2: compensated" in out.stdout
    assert "cancel_shipment -> refund_payment -> release_inventory" in out.stdout
