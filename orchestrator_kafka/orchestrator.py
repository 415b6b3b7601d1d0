"""The :class:`Orchestrator`: the I/O loop around the pure engine.

Per consumed batch: decode every message (the undecodable go to the dead-letter topic), load the batch's
sagas in one round trip, decide every event with :func:`engine.decide`, apply every transition in one
atomic store call (dedupe, version check, state, outbox, timers), publish the outboxes together, and
only then let the bus commit the offsets. A crash anywhere in between is safe: DESIGN section 6.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from . import codec
from .checks import check_context, check_id
from .constants import (
    ORCHESTRATOR_GROUP,
    TIMER_LEASE_SECONDS,
    Topics,
)
from .context import SagaContext, WorkflowState
from .dead_letters import dead_letter
from .engine import Event, TimerFired, Transition, decide
from .errors import (
    DecodeError,
    EventBusError,
    OrchestratorError,
    StateStoreError,
    ValidationError,
    WorkflowExecutionError,
)
from .lifecycle import Service
from .models import CancelBody, CancelSaga, StartBody, StartSaga, StepResult
from .ports import (
    Headers,
    IEventBus,
    ILogger,
    InboundMessage,
    IOrchestrator,
    IStateStore,
    IWorkflowDefinition,
    OutboxMessage,
    Subscription,
    TransitionWrite,
)
from .telemetry import Telemetry
from .workflow import WorkflowDefinition

Clock = Callable[[], datetime]
_MAX_ROUNDS = 8


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class _Round:
    """The writes one round of deciding made, with the index of the event each belongs to."""

    now: datetime
    remembered: bool = True  # the cache took the new states when they were decided
    writes: list[TransitionWrite] = field(default_factory=list)
    owners: list[int] = field(default_factory=list)


@dataclass(slots=True)
class Outcome:
    """What handling one event came to: its transition, or the reason it could not be handled."""

    transition: Transition | None = None
    problem: str | None = None
    detail: str = ""
    latency: float | None = None  # seconds from a result's command dispatch to the result, when known


class Orchestrator(IOrchestrator, Service):
    """Runs sagas of one or several workflows over an event bus and a state store.

    ``state_store=None`` means a :class:`RedisStateStore` on ``REDIS_URL``. Use ``async with`` or
    ``await start()`` / ``await stop()``; the public methods need a started orchestrator.
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
    ) -> None:
        definitions = [workflow] if isinstance(workflow, IWorkflowDefinition) else list(workflow)
        if not definitions:
            raise ValidationError("an Orchestrator needs at least one workflow definition")
        self._workflows: dict[str, WorkflowDefinition] = {}
        for definition in definitions:
            if not isinstance(definition, WorkflowDefinition):
                raise ValidationError(
                    f"expected a definition built by WorkflowBuilder, got {type(definition).__name__}"
                )
            if definition.get_id() in self._workflows:
                raise ValidationError(f"two workflows have the id {definition.get_id()!r}")
            self._workflows[definition.get_id()] = definition
        if not isinstance(event_bus, IEventBus):
            raise ValidationError(f"event_bus must be an IEventBus, got {type(event_bus).__name__}")
        if state_store is None:
            from .backends.redis import RedisStateStore

            state_store = RedisStateStore()
        self._bus = event_bus
        self._store = state_store
        self._log: ILogger = logger or logging.getLogger("orchestrator_kafka.orchestrator")
        self._clock = clock
        self._timer_interval = timer_interval
        self._sweep_interval = outbox_sweep_interval
        self._max_batch = max_batch
        self.topics = Topics(event_bus.topic_prefix)
        self._subscription: Subscription | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._acks: set[asyncio.Task[None]] = set()
        self._telemetry = Telemetry("orchestrator")
        # The sagas this instance wrote last, so the hot path needs no read before its write.
        self._cache: OrderedDict[str, SagaContext] = OrderedDict()
        self._cache_size = cache_size
        self._swept: dict[str, int] = {}
        # The completion of the last batch handed over by the bus (see _on_batch).
        self._pipeline: asyncio.Task[None] | None = None
        # Resolved once that batch is written: with the sagas it did not write as decided, or None if it
        # failed. And the batch before it, while in flight.
        self._written: asyncio.Future[frozenset[str] | None] | None = None
        self._older: asyncio.Task[None] | None = None
        self._started = False

    # ---------------------------------------------------------------- lifecycle

    def get_workflow_definition(self) -> IWorkflowDefinition:
        """The (first) workflow definition this orchestrator runs."""
        return next(iter(self._workflows.values()))

    @property
    def workflows(self) -> dict[str, WorkflowDefinition]:
        """The workflow definitions this orchestrator runs, by id."""
        return dict(self._workflows)

    @property
    def state_store(self) -> IStateStore:
        return self._store

    @property
    def event_bus(self) -> IEventBus:
        return self._bus

    async def start(self) -> None:
        """Connect, create the topics, re-publish what a crash left in outboxes, start consuming.

        Raises:
            EventBusError, StateStoreError: a backend could not be reached.
        """
        if self._started:
            return
        await self._bus.start()
        # Built at start: by now the application has installed its OpenTelemetry providers, if any.
        self._telemetry = Telemetry("orchestrator")
        topics = [self.topics.start, self.topics.results, self.topics.events, self.topics.dlq]
        for definition in self._workflows.values():
            for step in definition.get_steps():
                topics.append(self.topics.commands(step.worker_name))
                if step.compensation:
                    topics.append(self.topics.compensations(step.compensation))
        await self._bus.ensure_topics(sorted(set(topics)))
        await self._sweep_outboxes(everything=True)
        self._subscription = await self._bus.subscribe(
            [self.topics.start, self.topics.results],
            self.topics.group(ORCHESTRATOR_GROUP),
            self._on_batch,
            max_batch=self._max_batch,
        )
        self._ticker = asyncio.get_running_loop().create_task(self._tick(), name="orchestrator-timers")
        self._started = True
        self._log.info("orchestrator started for workflows %s", sorted(self._workflows))

    async def stop(self) -> None:
        """Stop consuming and firing timers; idempotent. Leaves the bus and store to their owner."""
        if not self._started:
            return
        self._started = False
        ticker, self._ticker = self._ticker, None
        if ticker is not None:
            ticker.cancel()
            # wait(), not await: a cancel of stop() itself must not be taken for the ticker's.
            await asyncio.wait({ticker})
        if self._subscription is not None:
            await self._subscription.stop()  # settles the batches in flight
            self._subscription = None
        pipeline, self._pipeline, self._written, self._older = self._pipeline, None, None, None
        if pipeline is not None and not pipeline.done():
            # The bus gave up waiting for it: a batch still being written is cut short, uncommitted, and
            # redelivered to whoever takes its partitions.
            await asyncio.wait({pipeline}, timeout=5.0)
            pipeline.cancel()
            await asyncio.wait({pipeline})
        if self._acks:
            # Bounded: a lost ack costs only a second publish by the next start-up sweep.
            await asyncio.wait(self._acks, timeout=5.0)
        self._log.info("orchestrator stopped")

    def _require_started(self) -> None:
        if not self._started:
            raise WorkflowExecutionError("the orchestrator is not started: call 'await orchestrator.start()'")

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
        outcome = (await self._handle_requests([event]))[0]
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
        outcome = (await self._handle_requests([event]))[0]
        if outcome.problem:
            raise ValueError(f"unknown transaction id {transaction_id!r}")
        assert outcome.transition is not None
        if outcome.transition.rejected:
            raise WorkflowExecutionError(f"cannot cancel {transaction_id!r}: {outcome.transition.rejected}")
        return True

    async def _load(self, transaction_id: str) -> SagaContext:
        try:
            check_id("transaction_id", transaction_id)
        except ValidationError as exc:
            raise ValueError(str(exc)) from None
        saga = await self._store.load_context(transaction_id)
        if saga is None:
            raise ValueError(f"unknown transaction id {transaction_id!r}")
        return saga

    async def _handle_requests(self, events: Sequence[Event]) -> list[Outcome]:
        try:
            return await self.process(events)
        except (StateStoreError, EventBusError) as exc:
            raise WorkflowExecutionError(f"could not record the request: {exc}") from exc

    # ---------------------------------------------------------------- the hot path

    async def _on_batch(self, batch: Sequence[InboundMessage]) -> asyncio.Task[None]:
        """Decode and decide ``batch``, and return its completion: the task that writes it once the batch
        before is written, and publishes it once the batch before is published. The bus hands over the
        next batch meanwhile, so deciding it overlaps this one's round trips to Redis and Kafka, and
        commits this batch's offsets only when the completion has finished."""
        events: list[Event] = []
        sources: list[InboundMessage] = []
        dead: list[OutboxMessage] = []
        for message in batch:
            try:
                event = codec.decode(message.value)
            except DecodeError as exc:
                dead.append(self._dead(message, exc.reason, exc.detail))
                continue
            expected = (StepResult,) if message.topic == self.topics.results else (StartSaga, CancelSaga)
            if not isinstance(event, expected):
                dead.append(
                    self._dead(
                        message,
                        codec.UNEXPECTED_EVENT_TYPE,
                        f"{event.event_type} does not belong on {message.topic}",
                    )
                )
                continue
            events.append(event)
            sources.append(message)
        headers = [m.headers for m in sources]
        outcomes = [Outcome() for _ in events]
        # The batch before, while it is still in flight: this one is decided on top of it. One that has
        # finished needs no waiting; after one that failed, the bus hands over nothing until it has
        # rewound, so a batch that comes after a failure starts afresh.
        previous = self._in_flight()
        before_written = self._written if previous is not None else None
        older = self._older if previous is not None else None
        written: asyncio.Future[frozenset[str] | None] = asyncio.get_running_loop().create_future()
        try:
            first = await self._decide_round(events, headers, list(range(len(events))), outcomes)
        except BaseException:
            self._cache.clear()  # it may hold states decided for this batch
            raise

        async def complete() -> None:
            try:
                # Decided on top of the batch before, this one is written after it, or not at all; the
                # sagas the batch before did not write as decided are decided again.
                redo = await before_written if before_written is not None else frozenset()
                if redo is None:
                    raise OrchestratorError("not applied: the batch before failed; both are redelivered")
                await self._settle(
                    events, headers, outcomes, first, written=written, after=previous, redo=redo
                )
                for outcome, message in zip(outcomes, sources, strict=True):
                    if outcome.problem:
                        dead.append(self._dead(message, outcome.problem, outcome.detail))
                if dead:
                    await self._bus.publish(dead)
            except BaseException:
                if not written.done():
                    written.set_result(None)
                self._cache.clear()  # it holds states decided on top of writes that did not happen
                raise

        task = asyncio.get_running_loop().create_task(complete(), name="orchestrator-batch")
        self._pipeline, self._written, self._older = task, written, previous
        # At most one batch decided ahead of the one being written, and two publishing: the next fetch
        # then takes everything that arrived meanwhile, instead of racing ahead in small batches, and a
        # slow broker holds the consumer back.
        if before_written is not None:
            await asyncio.wait({before_written})
        if older is not None:
            await asyncio.wait({older})
        return task

    def _in_flight(self) -> asyncio.Task[None] | None:
        """The completion of the last batch handed over, while it runs."""
        pipeline = self._pipeline
        return pipeline if pipeline is not None and not pipeline.done() else None

    def _dead(self, message: InboundMessage, reason: str, detail: str) -> OutboxMessage:
        self._telemetry.dead_letter(reason, message.topic)
        self._log.warning(
            "dead letter from %s[%d]@%d: %s (%s)",
            message.topic,
            message.partition,
            message.offset,
            reason,
            detail,
        )
        return dead_letter(message, self.topics.dlq, reason, detail)

    async def process(self, events: Sequence[Event], headers: Sequence[Headers] = ()) -> list[Outcome]:
        """Decide and apply ``events`` (in order), publish what they produce; an outcome per event.
        ``headers``, one per event when given, carry the events' trace context.

        Raises:
            StateStoreError, EventBusError: a backend failed; the caller retries the whole batch, and
                dedupe makes the retry safe.
        """
        outcomes = [Outcome() for _ in events]
        # Decided on the sagas as stored, not as a batch in flight may still write them, and published
        # after that batch's messages, so a request never overtakes what a saga already sent.
        first = await self._decide_round(
            events, headers, list(range(len(events))), outcomes, speculative=False
        )
        await self._settle(events, headers, outcomes, first, after=self._in_flight(), after_may_fail=True)
        return outcomes

    async def _decide_round(
        self,
        events: Sequence[Event],
        headers: Sequence[Headers],
        pending: list[int],
        outcomes: list[Outcome],
        *,
        speculative: bool = True,
    ) -> _Round:
        """Decide the events ``pending`` (indexes into ``events``). ``speculative``: on the sagas as this
        instance last decided them (the cache holds each saga's newest state, written or still being
        written), remembering the new states at once; otherwise on the sagas as stored, remembering a
        new state once it is written."""
        ids = {_tx_of(events[i]) for i in pending}
        sagas = await self._sagas_of(ids) if speculative else await self._store.load_contexts(list(ids))
        decided = _Round(self._clock(), remembered=speculative)
        for i in pending:
            write = self._decide(events[i], sagas, decided.now, outcomes[i], headers[i] if headers else ())
            if write is not None:
                decided.writes.append(write)
                decided.owners.append(i)
                if speculative and write.saga is not None:
                    self._remember(write.saga)
        return decided

    async def _settle(
        self,
        events: Sequence[Event],
        headers: Sequence[Headers],
        outcomes: list[Outcome],
        decided: _Round,
        *,
        written: asyncio.Future[frozenset[str] | None] | None = None,
        after: asyncio.Task[None] | None = None,
        redo: frozenset[str] = frozenset(),
        after_may_fail: bool = False,
    ) -> None:
        """Apply a decided round, publish what it produced, and decide and apply again what conflicted.

        ``redo``: sagas whose writes here were decided on a state the batch before did not write; they
        are decided again instead of applied (the version check alone could let one through: another
        writer may have moved the saga to the very version that batch expected to write). ``written`` is
        resolved once every write is in, with the sagas not written as first decided. The first publish
        waits for ``after`` (the batch before), so one saga's messages keep their order.

        Raises:
            OrchestratorError: ``after`` failed (unless ``after_may_fail``); this batch's writes stand
                and are published again from the outbox when it is redelivered.
        """
        diverged: set[str] = set()
        for _ in range(_MAX_ROUNDS):
            retry: list[int] = []
            writes, owners = decided.writes, decided.owners
            if redo:
                keep = [k for k, w in enumerate(writes) if w.transaction_id not in redo]
                retry = [owners[k] for k, w in enumerate(writes) if w.transaction_id in redo]
                writes, owners = [writes[k] for k in keep], [owners[k] for k in keep]
                for tx in redo:
                    self._cache.pop(tx, None)
                diverged |= redo
                redo = frozenset()
            results = await self._store.apply(writes) if writes else []
            publish: list[OutboxMessage] = []
            acks: dict[str, int] = {}
            for i, write, result in zip(owners, writes, results, strict=True):
                if result.status in ("conflict", "duplicate"):
                    # The saga was not what this instance had decided on: forget it, load it afresh.
                    self._cache.pop(write.transaction_id, None)
                    diverged.add(write.transaction_id)
                if result.status == "applied":
                    if not decided.remembered and write.saga is not None:
                        self._remember(write.saga)
                    if self._telemetry.enabled:
                        self._observe(events[i], outcomes[i], headers[i] if headers else (), decided.now)
                if result.status == "conflict":
                    retry.append(i)
                elif result.status == "applied" and write.outbox:
                    publish.extend(write.outbox)
                    acks[write.transaction_id] = write.expected_version + 1
                elif result.status == "duplicate" and result.outbox:
                    # Redelivered after a crash between the write and the publish: publish again.
                    publish.extend(result.outbox)
                    acks[write.transaction_id] = max(acks.get(write.transaction_id, 0), result.outbox_id)
            if not retry and written is not None and not written.done():
                written.set_result(frozenset(diverged))
            if after is not None:
                await asyncio.wait({after})
                if not after_may_fail and (after.cancelled() or after.exception() is not None):
                    raise OrchestratorError("not published: the batch before failed; both are redelivered")
                after = None
            if publish:
                await self._bus.publish(publish)
                self._ack_later(acks)
            if not retry:
                return
            decided = await self._decide_round(
                events, headers, sorted(retry), outcomes, speculative=decided.remembered
            )
        raise StateStoreError(f"{len(decided.owners)} events still conflicted after {_MAX_ROUNDS} rounds")

    async def _sagas_of(self, transaction_ids: set[str]) -> dict[str, SagaContext]:
        """The sagas, from the cache where it has them, else from the store in one round trip."""
        cache = self._cache
        found = {tx: cache[tx] for tx in transaction_ids if tx in cache}
        missing = [tx for tx in transaction_ids if tx not in found]
        if missing:
            found.update(await self._store.load_contexts(missing))
        return found

    def _remember(self, saga: SagaContext) -> None:
        """Keep the state this instance decided for a saga, before it is written: the next event of the
        saga, even in the next batch, needs no read. The cache may go stale (the write conflicts,
        another instance took the partition, an operator saved the saga): the version check then
        refuses the next write, and the saga is forgotten and loaded afresh."""
        tx = saga.transaction_id
        self._cache[tx] = saga
        self._cache.move_to_end(tx)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def _ack_later(self, acks: dict[str, int]) -> None:
        """Forget published outbox entries off the hot path: the offsets need not wait for it, and an
        entry whose ack is lost is only published once more by the sweep."""

        async def ack() -> None:
            try:
                await self._store.ack_outbox(list(acks.items()))
            except OrchestratorError as exc:
                self._log.warning("could not acknowledge outboxes (the sweep will re-publish): %s", exc)

        task = asyncio.get_running_loop().create_task(ack())
        self._acks.add(task)
        task.add_done_callback(self._acks.discard)

    def _decide(
        self,
        event: Event,
        sagas: dict[str, SagaContext],
        now: datetime,
        outcome: Outcome,
        headers: Headers = (),
    ) -> TransitionWrite | None:
        tx, event_id = _tx_of(event), event.event_id
        # A fired timer is deleted by the write that handles it, so it fires once.
        fired: tuple[str, ...] = (event.timer.timer_id,) if isinstance(event, TimerFired) else ()
        saga = sagas.get(tx)
        workflow_id = saga.workflow_id if saga is not None else getattr(event, "workflow_id", None)
        definition = self._workflows.get(workflow_id or "")
        if definition is None:
            if saga is None and isinstance(event, TimerFired):
                return TransitionWrite(event_id, tx, 0, cancel_timers=fired)
            outcome.problem = "unknown_workflow"
            outcome.detail = f"this orchestrator does not run workflow {workflow_id!r}"
            return None
        if saga is None and not isinstance(event, StartSaga | TimerFired):
            outcome.problem = codec.UNKNOWN_TRANSACTION
            outcome.detail = f"no saga {tx!r}"
            return None
        transition = decide(definition, saga, event, now, self.topics)
        outcome.transition = transition
        expected = saga.version if saga is not None else 0
        if not transition.changed:
            return TransitionWrite(event_id, tx, expected, cancel_timers=fired)
        assert transition.saga is not None
        if self._telemetry.enabled:
            if saga is None:
                started = self._telemetry.saga_started(transition.saga.workflow_id, tx, headers)
                transition.saga.traceparent = started
            elif isinstance(event, StepResult):
                runtime = saga.steps.get(event.body.step)  # as it was before this result
                if runtime and runtime.command_id == event.body.command_id and runtime.dispatched_at:
                    outcome.latency = now.timestamp() - runtime.dispatched_at
        sagas[tx] = transition.saga
        return TransitionWrite(
            event_id,
            tx,
            expected,
            transition.saga,
            self._outbox(transition),
            transition.timers,
            transition.cancel_timers + fired,
        )

    def _outbox(self, transition: Transition) -> tuple[OutboxMessage, ...]:
        saga = transition.saga
        key = saga.transaction_id if saga else ""
        if saga is None or not self._telemetry.tracing:
            return tuple([OutboxMessage(o.topic, key, o.encode()) for o in transition.outgoing])
        return tuple(
            OutboxMessage(
                o.topic,
                key,
                o.encode(),
                self._telemetry.dispatched(saga.traceparent, o.payload, o.topic)
                if o.payload["event_type"] == "step.command"
                else (),
            )
            for o in transition.outgoing
        )

    def _observe(self, event: Event, outcome: Outcome, headers: Headers, now: datetime) -> None:
        """Spans and metrics of an applied transition."""
        transition = outcome.transition
        assert transition is not None and transition.saga is not None
        saga = transition.saga
        if isinstance(event, StepResult):
            self._telemetry.result_taken(
                headers,
                saga.traceparent,
                saga.transaction_id,
                event.body.step,
                event.body.status,
                outcome.latency,
            )
        body = transition.outgoing[-1].payload["body"]  # an applied transition's audit record comes last
        self._telemetry.transition(
            saga.workflow_id,
            saga.transaction_id,
            body["from_state"],
            body["to_state"],
            body["actions"],
            saga.traceparent,
            saga.created_at,
            now,
            saga.error,
        )

    # ---------------------------------------------------------------- timers and recovery

    async def _tick(self) -> None:
        """Fire due timers; now and then re-publish outboxes a failed publish left behind."""
        loop = asyncio.get_running_loop()
        next_sweep = loop.time() + self._sweep_interval
        # The flag, not only the cancel, ends the loop: redis-py can turn a cancel that lands in a read
        # into a timeout error (asyncio.timeout in Python 3.11), which the except below would swallow.
        while self._started:
            try:
                timers = await self._store.claim_due_timers(
                    self._clock().timestamp(), self._max_batch, TIMER_LEASE_SECONDS
                )
                if timers:
                    await self.process([TimerFired(t) for t in timers])
                if loop.time() >= next_sweep:
                    next_sweep = loop.time() + self._sweep_interval
                    await self._sweep_outboxes()
                    if self._telemetry.metering:
                        await self._count_in_flight()
                if len(timers) == self._max_batch:
                    continue
            except OrchestratorError as exc:
                # A backend is down: the timers stay claimed for their lease and fire again later.
                self._log.warning("timer loop: %s", exc)
            except Exception:  # noqa: BLE001 - the timer loop must outlive any single failure
                self._log.exception("timer loop failed")
            await asyncio.sleep(self._timer_interval)

    async def _count_in_flight(self) -> None:
        counts = dict.fromkeys(self._workflows, 0)
        for state in (WorkflowState.PENDING, WorkflowState.RUNNING, WorkflowState.COMPENSATING):
            for workflow_id in self._workflows:
                counts[workflow_id] += len(await self._store.list_contexts(workflow_id, state.value))
        self._telemetry.set_in_flight(counts)

    async def _sweep_outboxes(self, *, everything: bool = False) -> None:
        """Re-publish what a crash or a failed publish left in outboxes: at start-up everything; later,
        only what has not moved since the last sweep, not the entries of batches still publishing."""
        pending = await self._store.pending_outboxes()
        seen, self._swept = self._swept, {p.transaction_id: p.outbox_id for p in pending}
        stale = pending if everything else [p for p in pending if seen.get(p.transaction_id) == p.outbox_id]
        if not stale:
            return
        await self._bus.publish([m for p in stale for m in p.messages])
        await self._store.ack_outbox([(p.transaction_id, p.outbox_id) for p in stale])
        self._log.info("re-published the outboxes of %d sagas", len(stale))


def _tx_of(event: Event) -> str:
    return event.timer.transaction_id if isinstance(event, TimerFired) else event.transaction_id
