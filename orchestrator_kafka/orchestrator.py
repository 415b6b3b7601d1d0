"""The :class:`Orchestrator`: the public API and the lifecycle around the pipeline.

The consumed batches go through :class:`~orchestrator_kafka.pipeline.Pipeline` (decode, decide, write,
publish); due timers and the outbox sweep through :class:`~orchestrator_kafka.timers.Housekeeping`.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from . import codec
from .checks import check_context, check_id
from .constants import ORCHESTRATOR_GROUP, Topics
from .context import SagaContext
from .driven import as_definition
from .engine import Event
from .errors import (
    EventBusError,
    OrchestratorError,
    StateStoreError,
    ValidationError,
    WorkflowExecutionError,
)
from .lifecycle import Service
from .models import CancelBody, CancelSaga, StartBody, StartSaga
from .pipeline import Outcome, Pipeline
from .ports import IEventBus, ILogger, IOrchestrator, IStateStore, Subscription
from .telemetry import Telemetry
from .timers import Housekeeping
from .versions import Versions
from .waiting import Waiters
from .workflow import IWorkflowDefinition, WorkflowDefinition

Clock = Callable[[], datetime]

# Seconds a stopping orchestrator gives the batch still being written and the outbox acknowledgements.
_STOP_GRACE = 5.0


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Orchestrator(IOrchestrator, Service):
    """Runs sagas of one or several workflows over an event bus and a state store.

    ``workflow`` may hold several versions of one workflow (a rollout: the old one for the sagas in
    flight, the new one for new sagas). New sagas take the version named in ``default_versions`` (by
    workflow id), else the one given last; each saga runs on the version it started with to its end.

    ``state_store=None`` means a :class:`RedisStateStore` on ``REDIS_URL``, which the orchestrator
    closes when it stops (it cannot start again then). Use ``async with`` or ``await start()`` /
    ``await stop()``; the public methods need a started orchestrator.
    """

    def __init__(
        self,
        workflow: IWorkflowDefinition | Sequence[IWorkflowDefinition],
        event_bus: IEventBus,
        state_store: IStateStore | None = None,
        logger: ILogger | None = None,
        *,
        clock: Clock = _utcnow,
        timer_interval: float = 0.05,
        outbox_sweep_interval: float = 5.0,
        max_batch: int = 500,
        cache_size: int = 10_000,
        default_versions: Mapping[str, str] | None = None,
    ) -> None:
        given = [workflow] if isinstance(workflow, IWorkflowDefinition) else list(workflow)
        # A user's own IWorkflowDefinition is driven through get_initial_step and get_next_step.
        self._versions = Versions([as_definition(d) for d in given], default_versions)
        self._workflows: dict[str, WorkflowDefinition] = self._versions.defaults()
        if not isinstance(event_bus, IEventBus):
            raise ValidationError(f"event_bus must be an IEventBus, got {type(event_bus).__name__}")
        self._owns_store = state_store is None
        if state_store is None:
            from .backends.redis import RedisStateStore

            state_store = RedisStateStore()
        self._bus = event_bus
        self._store = state_store
        self._log: ILogger = logger or logging.getLogger("orchestrator_kafka.orchestrator")
        self._clock = clock
        self._max_batch = max_batch
        self.topics = Topics(event_bus.topic_prefix)
        self._pipeline = Pipeline(
            self._versions, event_bus, state_store, self._log, clock=clock, cache_size=cache_size
        )
        self._housekeeping = Housekeeping(
            self._pipeline,
            event_bus,
            state_store,
            self._log,
            workflow_ids=list(self._workflows),
            clock=clock,
            timer_interval=timer_interval,
            sweep_interval=outbox_sweep_interval,
            max_batch=max_batch,
        )
        self._subscription: Subscription | None = None
        self._waiters = Waiters(event_bus, state_store.load_context, self.topics.events, self._log)
        self._started = False
        self._store_closed = False

    # ---------------------------------------------------------------- lifecycle

    def get_workflow_definition(self) -> IWorkflowDefinition:
        """The (first) workflow definition this orchestrator runs."""
        return next(iter(self._workflows.values()))

    @property
    def workflows(self) -> dict[str, WorkflowDefinition]:
        """The workflow definitions new sagas take, by id."""
        return dict(self._workflows)

    @property
    def versions(self) -> Versions:
        """Every version of every workflow this orchestrator carries, and the one new sagas take."""
        return self._versions

    @property
    def state_store(self) -> IStateStore:
        return self._store

    @property
    def event_bus(self) -> IEventBus:
        return self._bus

    @property
    def pipeline(self) -> Pipeline:
        """The batch pipeline: its :meth:`~Pipeline.handle_batch` is what the bus calls with each
        consumed batch, and :meth:`~Pipeline.process` handles events made in process."""
        return self._pipeline

    async def start(self) -> None:
        """Connect, create the topics, check their partition count against the store's, re-publish what a
        crash left in outboxes, start consuming.

        Raises:
            EventBusError, StateStoreError: a backend could not be reached.
            ConfigurationError: the state store is set up to lose sagas (a Redis that evicts keys).
            ValidationError: the consumed topics' partition counts differ from each other or from the one
                the store recorded at first start.
        """
        if self._started:
            return
        if self._store_closed:
            raise WorkflowExecutionError(
                "this orchestrator closed the state store it made when it stopped: make a new Orchestrator"
            )
        # Before anything runs: a store that would drop sagas must not take a single one.
        await self._store.check()
        await self._bus.start()
        # Built at start: by now the application has installed its OpenTelemetry providers, if any.
        self._pipeline.telemetry = Telemetry("orchestrator")
        topics = [self.topics.start, self.topics.results, self.topics.events, self.topics.dlq]
        for definition in self._versions.all():
            for step in definition.get_steps():
                # Both topics of every worker name, a compensation-only one included: a worker (in any
                # language) subscribes to both, and some clients stop on a missing subscribed topic.
                topics.extend(self.topics.of_worker(step.worker_name))
                if step.compensation:
                    topics.extend(self.topics.of_worker(step.compensation))
        await self._bus.ensure_topics(sorted(set(topics)))
        await self._check_partitions([self.topics.start, self.topics.results])
        await self._housekeeping.sweep_outboxes(everything=True)
        self._subscription = await self._bus.subscribe(
            [self.topics.start, self.topics.results],
            self.topics.group(ORCHESTRATOR_GROUP),
            self._pipeline.handle_batch,
            max_batch=self._max_batch,
        )
        self._housekeeping.start()
        self._started = True
        self._log.info("orchestrator started for workflows %s", sorted(self._workflows))

    async def _check_partitions(self, consumed: Sequence[str]) -> None:
        """Hand the store the partition count of the topics consumed, which must be one (a range
        assignor then gives partition n of each to one orchestrator, DESIGN section 10).

        Raises:
            ValidationError: the topics differ, or the store recorded another count at first start.
        """
        counts = {topic: await self._bus.partition_count(topic) for topic in consumed}
        known = {count for count in counts.values() if count is not None}
        if len(known) > 1:
            raise ValidationError(
                f"the topics the orchestrator consumes must have one partition count: {counts}"
            )
        if known:
            await self._store.use_partitions(known.pop())

    async def stop(self) -> None:
        """Stop consuming and firing timers, and close the state store if the orchestrator made it;
        idempotent. Leaves a bus, and a store that was passed in, to their owner."""
        if not self._started:
            return
        self._started = False
        await self._waiters.close("the orchestrator stopped before the saga ended")
        await self._housekeeping.stop()
        if self._subscription is not None:
            await self._subscription.stop()  # settles the batches in flight
            self._subscription = None
        # The bus gave up waiting for a batch still being written: it is cut short, uncommitted, and
        # redelivered to whoever takes its partitions.
        await self._pipeline.drain(_STOP_GRACE)
        if self._owns_store:
            self._store_closed = True
            await self._store.close()
        self._log.info("orchestrator stopped")

    def unready_reason(self) -> str | None:
        """Why the orchestrator cannot make progress right now (the state store refuses writes), for
        the readiness probe; None when it can."""
        return self._pipeline.refusals.reason()

    def _require_started(self) -> None:
        if not self._started:
            raise WorkflowExecutionError("the orchestrator is not started: call 'await orchestrator.start()'")

    async def process(self, events: Sequence[Event]) -> list[Outcome]:
        """Decide and apply ``events`` in order and publish what they produce; an outcome per event
        (see :meth:`Pipeline.process`)."""
        return await self._pipeline.process(events)

    # ---------------------------------------------------------------- public API

    async def execute_workflow(
        self, workflow_id: str, initial_context: dict[str, Any], *, transaction_id: str | None = None
    ) -> str:
        """Start a saga of ``workflow_id`` with ``initial_context`` and return its transaction id.

        Returns once the saga is recorded. A ``transaction_id`` given by the caller is an idempotency
        key: starting a known id again starts nothing and returns it.

        Raises:
            ValidationError: unknown workflow, a context that is not a JSON-serialisable dict with str
                keys, or a bad transaction id.
            WorkflowExecutionError: the orchestrator is not started, or the saga could not be recorded.
        """
        check_id("workflow_id", workflow_id)
        if workflow_id not in self._workflows:
            raise ValidationError(
                f"unknown workflow {workflow_id!r}; this orchestrator runs {sorted(self._workflows)}"
            )
        context = check_context(initial_context)
        tx = check_id("transaction_id", transaction_id) if transaction_id is not None else str(uuid.uuid4())
        self._require_started()
        event = StartSaga(
            event_id=str(uuid.uuid4()),
            transaction_id=tx,
            workflow_id=workflow_id,
            occurred_at=self._clock(),
            body=StartBody(context=context),
        )
        outcome = (await self._request([event]))[0]
        existing = outcome.transition.saga if outcome.transition else None
        if existing is not None and existing.workflow_id != workflow_id:
            raise WorkflowExecutionError(
                f"transaction {tx!r} already belongs to workflow {existing.workflow_id!r}"
            )
        return tx

    async def get_status(self, transaction_id: str) -> dict[str, Any]:
        """The saga's status: ``transaction_id``, ``workflow_id``, ``state``, ``current_step``,
        ``step_results``, ``error``, ``created_at``, ``updated_at`` (ISO 8601, UTC) and more.

        Raises:
            ValueError: unknown or malformed transaction id.
            StateStoreError: the store could not be read.
        """
        saga = await self._load(transaction_id)
        return saga.to_status()

    async def cancel_workflow(self, transaction_id: str) -> bool:
        """Cancel a pending or running saga: its in-flight and completed steps are compensated, in the
        order of a failure, and it ends ``cancelled``. Returns True once the request is recorded.

        Raises:
            ValueError: unknown or malformed transaction id.
            WorkflowExecutionError: the saga is compensating or final, or the orchestrator is stopped.
        """
        saga = await self._load(transaction_id)
        self._require_started()
        event = CancelSaga(
            event_id=str(uuid.uuid4()),
            transaction_id=transaction_id,
            workflow_id=saga.workflow_id,
            occurred_at=self._clock(),
            body=CancelBody(reason="cancelled by request"),
        )
        outcome = (await self._request([event]))[0]
        if outcome.problem == codec.UNKNOWN_VERSION:
            raise WorkflowExecutionError(f"cannot cancel {transaction_id!r}: {outcome.detail}")
        if outcome.problem:
            raise ValueError(f"unknown transaction id {transaction_id!r}")
        assert outcome.transition is not None
        if outcome.transition.rejected:
            raise WorkflowExecutionError(f"cannot cancel {transaction_id!r}: {outcome.transition.rejected}")
        return True

    async def wait_for(
        self,
        transaction_id: str,
        timeout: float | None = None,  # noqa: ASYNC109 - the signature issue 13 asks for
    ) -> dict[str, Any]:
        """The saga's final status (as :meth:`get_status` gives it) once it has ended; at once when it
        has already. Every waiter of this orchestrator is served by one watch of the audit topic; no
        waiter polls.

        Raises:
            TimeoutError: ``timeout`` seconds passed first (None: no limit).
            ValueError: unknown or malformed transaction id.
            WorkflowExecutionError: the orchestrator is not started, or stopped while waiting.
            EventBusError: the bus stopped while waiting, or the audit topic cannot be watched.
        """
        try:
            check_id("transaction_id", transaction_id)
        except ValidationError as exc:
            raise ValueError(str(exc)) from None
        self._require_started()
        try:
            return await self._waiters.wait_for(transaction_id, timeout, known=True)
        except OrchestratorError as exc:
            if type(exc) is OrchestratorError:  # the waiters were closed: this orchestrator stopped
                raise WorkflowExecutionError(str(exc)) from None
            raise

    async def _load(self, transaction_id: str) -> SagaContext:
        try:
            check_id("transaction_id", transaction_id)
        except ValidationError as exc:
            raise ValueError(str(exc)) from None
        saga = await self._store.load_context(transaction_id)
        if saga is None:
            raise ValueError(f"unknown transaction id {transaction_id!r}")
        return saga

    async def _request(self, events: Sequence[Event]) -> list[Outcome]:
        try:
            return await self._pipeline.process(events)
        except (StateStoreError, EventBusError) as exc:
            raise WorkflowExecutionError(f"could not record the request: {exc}") from exc
