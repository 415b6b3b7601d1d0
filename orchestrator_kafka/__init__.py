"""orchestrator-kafka: a saga orchestrator for Python on Apache Kafka and Redis.

Everything a user needs is importable from here; ``__all__`` is the public API.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .backends.memory import InMemoryEventBus, InMemoryStateStore
from .client import SagaClient
from .context import SagaContext, WorkflowState
from .errors import (
    ConfigurationError,
    EventBusError,
    NonRetryableError,
    NotReplicatedError,
    OrchestratorError,
    StateStoreError,
    StoreFullError,
    ValidationError,
    WorkflowExecutionError,
)
from .orchestrator import Orchestrator
from .ports import IEventBus, ILogger, IOrchestrator, IStateStore, IWorkflowDefinition
from .worker import StepContext, Worker
from .workflow import RetryPolicy, WorkflowBuilder, WorkflowDefinition, WorkflowStep

if TYPE_CHECKING:
    from .backends.kafka import KafkaEventBus
    from .backends.redis import RedisStateStore

__version__ = "0.1.0"

__all__ = [
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
]


def __getattr__(name: str) -> Any:
    # The Kafka and Redis backends load their client libraries only when asked for.
    if name == "KafkaEventBus":
        from .backends.kafka import KafkaEventBus

        return KafkaEventBus
    if name == "RedisStateStore":
        from .backends.redis import RedisStateStore

        return RedisStateStore
    raise AttributeError(f"module 'orchestrator_kafka' has no attribute {name!r}")
