"""The batch pipeline: decode a consumed batch, decide its events on the sagas, write the transitions in
one atomic store call, publish what they produce, and only then let the bus commit the offsets.

Batches overlap: batch N+1 is decided while batch N is written to the store and published, on top of
the states batch N is writing (the saga cache holds them). Batch N+1 is written only once batch N is
written, and published only once batch N is published, so one saga's messages keep their order. A
crash anywhere in between is safe: DESIGN section 6.
"""

from __future__ import annotations

import asyncio
import enum
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from . import codec
from .constants import Topics
from .context import SagaContext
from .engine import Event, TimerFired, Transition, decide, park
from .errors import OrchestratorError, StateStoreError, StoreFullError
from .intake import Intake
from .models import StartSaga, StepResult, of_run
from .ports import IEventBus, ILogger, IStateStore
from .refusals import WriteRefusals
from .telemetry import Telemetry
from .values import ApplyResult, Headers, InboundMessage, OutboxMessage, TransitionWrite
from .versions import Versions

Clock = Callable[[], datetime]
_MAX_ROUNDS = 8


@dataclass(slots=True)
class Outcome:
    """What handling one event came to: its transition, or the reason it could not be handled."""

    transition: Transition | None = None
    problem: str | None = None
    detail: str = ""
    latency: float | None = None  # seconds from a result's command dispatch to the result, when known


class Basis(enum.Enum):
    """What a round of deciding took the sagas' states from."""

    #: The states this instance decided last, written or still being written: the new states are
    #: remembered as soon as they are decided, so the next batch can be decided on top of them.
    DECIDED = "decided"
    #: The states as stored: a new state is remembered once it is written.
    STORED = "stored"


@dataclass(slots=True)
class _Work:
    """The events being handled together, the trace headers of each (or none), and their outcomes."""

    events: Sequence[Event]
    headers: Sequence[Headers]
    outcomes: list[Outcome]

    def headers_of(self, i: int) -> Headers:
        return self.headers[i] if self.headers else ()


@dataclass(slots=True)
class _Round:
    """The writes one round of deciding made, with the index of the event each belongs to."""

    now: datetime
    basis: Basis
    writes: list[TransitionWrite] = field(default_factory=list)
    owners: list[int] = field(default_factory=list)


@dataclass(slots=True)
class _Order:
    """Where the work stands behind the batch before it.

    ``after``: the completion of the batch before, while it runs; the first publish waits for it.
    ``after_must_succeed``: when it failed, publish nothing (a batch decided on top of it); a request
    decided on the stored sagas is published all the same. ``redo``: sagas decided on a state the batch
    before did not write; they are decided again instead of applied (the version check alone could let
    one through: another writer may have moved the saga to the very version that batch expected to
    write). ``written``: resolved once every write is in, with the sagas not written as first decided,
    or None when the work failed.
    """

    after: asyncio.Task[None] | None = None
    after_must_succeed: bool = True
    redo: frozenset[str] = frozenset()
    written: asyncio.Future[frozenset[str] | None] | None = None


@dataclass(slots=True)
class _InFlight:
    """The last batch handed over: its completion, the future of its writes, and the batch before it."""

    completion: asyncio.Task[None]
    written: asyncio.Future[frozenset[str] | None]
    previous: asyncio.Task[None] | None


class Pipeline:
    """Handles the orchestrator's consumed batches and its own requests; holds the saga cache.

    :meth:`handle_batch` is the bus's batch handler; :meth:`process` handles requests made in process.
    """

    def __init__(
        self,
        workflows: Versions,
        bus: IEventBus,
        store: IStateStore,
        log: ILogger,
        *,
        clock: Clock,
        cache_size: int,
    ) -> None:
        self._workflows = workflows
        self._bus = bus
        self._store = store
        self._log = log
        self._clock = clock
        self.topics = Topics(bus.topic_prefix)
        self._intake = Intake(self.topics, log, Telemetry("orchestrator"))
        # The sagas this instance decided last, so the hot path needs no read before its write.
        self._cache: OrderedDict[str, SagaContext] = OrderedDict()
        self._cache_size = cache_size
        self._last: _InFlight | None = None
        self._acks: set[asyncio.Task[None]] = set()
        #: The writes a full store refused: logged once per interval, counted, and the readiness reason.
        self.refusals = WriteRefusals(log, counted=lambda: self.telemetry.refused_write())

    @property
    def telemetry(self) -> Telemetry:
        """The spans and metrics of the sagas; replaced at start, once the application has installed its
        OpenTelemetry providers."""
        return self._intake.telemetry

    @telemetry.setter
    def telemetry(self, telemetry: Telemetry) -> None:
        self._intake.telemetry = telemetry

    @property
    def cached(self) -> frozenset[str]:
        """The transaction ids whose states the cache holds."""
        return frozenset(self._cache)

    # ---------------------------------------------------------------- consumed batches

    async def handle_batch(self, batch: Sequence[InboundMessage]) -> asyncio.Task[None]:
        """Decode and decide ``batch``, and return its completion: the task that writes it once the batch
        before is written, and publishes it once the batch before is published. The bus hands over the
        next batch meanwhile, so deciding it overlaps this one's round trips to Redis and Kafka, and
        commits this batch's offsets only when the completion has finished.

        Returns only once the batch before is written and the one before that published: at most one
        batch is decided ahead of the one being written, and two publish. The next fetch then takes
        everything that arrived meanwhile, instead of racing ahead in small batches, and a slow broker
        holds the consumer back.
        """
        events, sources, dead = self._intake.decode(batch)
        work = _Work(events, [m.headers for m in sources], [Outcome() for _ in events])
        # The batch before, while it is still in flight: this one is decided on top of it. One that has
        # finished needs no waiting; after one that failed, the bus hands over nothing until it has
        # rewound, so a batch that comes after a failure starts afresh.
        before = self._in_flight()
        written: asyncio.Future[frozenset[str] | None] = asyncio.get_running_loop().create_future()
        try:
            first = await self._decide_round(work, list(range(len(events))), Basis.DECIDED)
        except BaseException as exc:
            self._cache.clear()  # it may hold states decided for this batch
            if isinstance(exc, StoreFullError):  # a store that refuses even reads when full
                self.refusals.refused(exc)
            raise

        async def complete() -> None:
            try:
                # Decided on top of the batch before, this one is written after it, or not at all; the
                # sagas the batch before did not write as decided are decided again.
                redo = await before.written if before is not None else frozenset()
                if redo is None:
                    raise OrchestratorError("not applied: the batch before failed; both are redelivered")
                order = _Order(before.completion if before else None, True, redo, written)
                await self._settle(work, first, order)
                for outcome, message in zip(work.outcomes, sources, strict=True):
                    if outcome.problem:
                        dead.append(self._intake.dead(message, outcome.problem, outcome.detail))
                    elif outcome.transition is not None and outcome.transition.rejected:
                        self._log.warning(
                            "request refused, from %s[%d]@%d: %s",
                            message.topic,
                            message.partition,
                            message.offset,
                            outcome.transition.rejected,
                        )
                if dead:
                    await self._bus.publish(dead)
            except BaseException:
                if not written.done():
                    written.set_result(None)
                self._cache.clear()  # it holds states decided on top of writes that did not happen
                raise

        task = asyncio.get_running_loop().create_task(complete(), name="orchestrator-batch")
        self._last = _InFlight(task, written, before.completion if before else None)
        if before is not None:
            await asyncio.wait({before.written})
            if before.previous is not None:
                await asyncio.wait({before.previous})
        return task

    def _in_flight(self) -> _InFlight | None:
        """The last batch handed over, while its completion runs."""
        last = self._last
        return last if last is not None and not last.completion.done() else None

    # ---------------------------------------------------------------- requests and timers

    async def process(self, events: Sequence[Event], headers: Sequence[Headers] = ()) -> list[Outcome]:
        """Decide and apply ``events`` (in order), publish what they produce; an outcome per event.
        ``headers``, one per event when given, carry the events' trace context.

        Raises:
            StateStoreError, EventBusError: a backend failed; the caller retries the whole batch, and
                dedupe makes the retry safe.
        """
        work = _Work(events, headers, [Outcome() for _ in events])
        # Decided on the sagas as stored, not as a batch in flight may still write them, and published
        # after that batch's messages, so a request never overtakes what a saga already sent.
        first = await self._decide_round(work, list(range(len(events))), Basis.STORED)
        before = self._in_flight()
        await self._settle(work, first, _Order(before.completion if before else None, False))
        return work.outcomes

    async def drain(self, grace: float) -> None:
        """Let the batch still in flight finish for up to ``grace`` seconds, then cut it short (it is
        uncommitted, and redelivered to whoever takes its partitions); wait a bounded time for outbox
        acknowledgements (a lost one costs only a second publish by the next start-up sweep)."""
        last, self._last = self._last, None
        if last is not None and not last.completion.done():
            await asyncio.wait({last.completion}, timeout=grace)
            last.completion.cancel()
            await asyncio.wait({last.completion})
        if self._acks:
            await asyncio.wait(self._acks, timeout=grace)

    # ---------------------------------------------------------------- deciding and applying

    async def _decide_round(self, work: _Work, pending: list[int], basis: Basis) -> _Round:
        """Decide the events ``pending`` (indexes into ``work.events``) on the sagas as ``basis`` says."""
        ids = {_tx_of(work.events[i]) for i in pending}
        if basis is Basis.DECIDED:
            sagas = await self._sagas_of(ids)
        else:
            sagas = await self._store.load_contexts(list(ids))
        decided = _Round(self._clock(), basis)
        for i in pending:
            write = self.decide(work.events[i], sagas, decided.now, work.outcomes[i], work.headers_of(i))
            if write is not None:
                decided.writes.append(write)
                decided.owners.append(i)
                if basis is Basis.DECIDED and write.saga is not None:
                    self._remember(write.saga)
        return decided

    async def _settle(self, work: _Work, decided: _Round, order: _Order) -> None:
        """Apply a decided round, publish what it produced, and decide and apply again what conflicted.

        Raises:
            OrchestratorError: the batch before failed while ``order.after_must_succeed``; this work's
                writes stand and are published again from the outbox when it is redelivered.
        """
        diverged: set[str] = set()
        rechecked = False
        after, redo = order.after, order.redo
        for _ in range(_MAX_ROUNDS):
            retry: list[int] = []
            writes, owners = decided.writes, decided.owners
            if redo:
                retry = [owners[k] for k, w in enumerate(writes) if w.transaction_id in redo]
                keep = [k for k, w in enumerate(writes) if w.transaction_id not in redo]
                writes, owners = [writes[k] for k in keep], [owners[k] for k in keep]
                for tx in redo:
                    self._cache.pop(tx, None)
                diverged |= redo
                redo = frozenset()
            results = await self._apply(writes) if writes else []
            publish: list[OutboxMessage] = []
            # Acknowledged once published: each applied write's own entry, and the whole outbox up to
            # the id a duplicate returned (it returned every entry there was).
            written: list[tuple[str, int]] = []
            acks: dict[str, int] = {}
            for i, write, result in zip(owners, writes, results, strict=True):
                if result.status in ("conflict", "duplicate"):
                    # The saga was not what this instance had decided on: forget it, load it afresh.
                    self._cache.pop(write.transaction_id, None)
                    diverged.add(write.transaction_id)
                if result.status == "applied":
                    if decided.basis is Basis.STORED and write.saga is not None:
                        self._remember(write.saga)
                    if self.telemetry.enabled:
                        self._observe(work.events[i], work.outcomes[i], work.headers_of(i), decided.now)
                if result.status == "conflict":
                    retry.append(i)
                elif result.status == "applied" and write.outbox:
                    publish.extend(write.outbox)
                    written.append((write.transaction_id, write.expected_version + 1))
                elif result.status == "duplicate" and result.outbox:
                    # Redelivered after a crash between the write and the publish: publish again.
                    publish.extend(result.outbox)
                    acks[write.transaction_id] = max(acks.get(write.transaction_id, 0), result.outbox_id)
            if not retry and order.written is not None and not order.written.done():
                order.written.set_result(frozenset(diverged))
            if after is not None:
                await asyncio.wait({after})
                if order.after_must_succeed and (after.cancelled() or after.exception() is not None):
                    raise OrchestratorError("not published: the batch before failed; both are redelivered")
                after = None
            if publish:
                await self._bus.publish(publish)
                self._ack_later(written, list(acks.items()))
            basis = decided.basis
            if not retry and not rechecked:
                # A result refused as another run's was decided on the state this instance kept, which
                # may be its own guess: another instance that had the partition meanwhile may have
                # started the saga under another run. Decided again on the stored saga, once the
                # batch's own writes stand, it is a dead letter only if the store says so too.
                rechecked, basis = True, Basis.STORED
                if decided.basis is Basis.DECIDED or diverged:
                    retry = [i for i, o in enumerate(work.outcomes) if o.problem == codec.OTHER_RUN]
                    for i in retry:
                        work.outcomes[i] = Outcome()
            if not retry:
                return
            decided = await self._decide_round(work, sorted(retry), basis)
        raise StateStoreError(f"{len(decided.owners)} events still conflicted after {_MAX_ROUNDS} rounds")

    async def _apply(self, writes: Sequence[TransitionWrite]) -> list[ApplyResult]:
        """The store's apply, keeping the account of a full store. A refused batch wrote nothing and
        raises on: a consumed batch's offsets are then not committed and the bus redelivers it after its
        backoff; a timer stays claimed and fires again; a request's caller gets the error."""
        try:
            results = await self._store.apply(writes)
        except StoreFullError as exc:
            self.refusals.refused(exc)
            raise
        # Only a saga written proves the store has room again: a batch of duplicates writes nothing.
        if any(r.status == "applied" for r in results):
            self.refusals.accepted()
        return results

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
        if saga.state.is_final and not saga.late_runs:
            # An ended saga takes no more decisions but for a late duplicate, which reads it: the cache
            # then holds about the sagas in flight, not the last cache_size to run.
            self._cache.pop(tx, None)
            return
        self._cache[tx] = saga
        self._cache.move_to_end(tx)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def _ack_later(self, written: list[tuple[str, int]], upto: list[tuple[str, int]]) -> None:
        """Forget published outbox entries off the hot path: the offsets need not wait for it, and an
        entry whose ack is lost is only published once more by the sweep. ``written``: the entries this
        instance's writes made, each alone; ``upto``: whole outboxes, up to the id given."""

        async def ack() -> None:
            try:
                if written:
                    await self._store.ack_outbox(written, only=True)
                if upto:
                    await self._store.ack_outbox(upto)
            except OrchestratorError as exc:
                self._log.warning("could not acknowledge outboxes (the sweep will re-publish): %s", exc)

        task = asyncio.get_running_loop().create_task(ack())
        self._acks.add(task)
        task.add_done_callback(self._acks.discard)

    def decide(
        self,
        event: Event,
        sagas: dict[str, SagaContext],
        now: datetime,
        outcome: Outcome,
        headers: Headers = (),
    ) -> TransitionWrite | None:
        """Decide one event on ``sagas`` (updated with the new state) and return the write that applies
        it, or None when it cannot be handled (``outcome.problem`` says why)."""
        tx, event_id = _tx_of(event), event.event_id
        # A fired timer is deleted by the write that handles it, so it fires once.
        fired: tuple[str, ...] = (event.timer.timer_id,) if isinstance(event, TimerFired) else ()
        saga = sagas.get(tx)
        if saga is not None:
            definition = self._workflows.get(saga.workflow_id, saga.workflow_version)
            if definition is None:
                if isinstance(event, StartSaga):
                    # A start of a saga that exists changes nothing, whatever its version.
                    outcome.transition = Transition(saga, False, note="already started")
                    return TransitionWrite(event_id, tx, saga.version)
                return self._park(event, saga, sagas, now, outcome)
        else:
            workflow_id = getattr(event, "workflow_id", None)
            definition = self._workflows.default(workflow_id or "")
            if definition is None:
                if isinstance(event, TimerFired):
                    return TransitionWrite(event_id, tx, 0, cancel_timers=fired)
                outcome.problem = codec.UNKNOWN_WORKFLOW
                outcome.detail = f"this orchestrator does not run workflow {workflow_id!r}"
                return None
        if saga is None and not isinstance(event, StartSaga | TimerFired):
            outcome.problem = codec.UNKNOWN_TRANSACTION
            outcome.detail = f"no saga {tx!r}"
            return None
        if (
            saga is not None
            and isinstance(event, StepResult)
            and not of_run(event.body.command_id, tx, saga.run_id)
        ):
            # A result of an earlier saga under this transaction id (deleted, then started again): it
            # must never be applied to this one.
            outcome.problem = codec.OTHER_RUN
            outcome.detail = f"{event.body.command_id!r} is not a command of run {saga.run_id!r} of {tx!r}"
            return None
        transition = decide(definition, saga, event, now, self.topics)
        outcome.transition = transition
        expected = saga.version if saga is not None else 0
        if not transition.changed:
            return TransitionWrite(event_id, tx, expected, cancel_timers=fired)
        assert transition.saga is not None
        if self.telemetry.enabled:
            if saga is None:
                started = self.telemetry.saga_started(transition.saga.workflow_id, tx, headers)
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

    def _park(
        self,
        event: Event,
        saga: SagaContext,
        sagas: dict[str, SagaContext],
        now: datetime,
        outcome: Outcome,
    ) -> TransitionWrite | None:
        """An event of a saga whose workflow version this orchestrator does not carry: the event is not
        applied, and the saga is parked (once) with the reason in its status and its audit.

        A result or cancel is dead-lettered (``unknown_version``) for redrive once an orchestrator with
        the version runs; a timer is held: left unhandled, it is claimed again when its lease ends. The
        park is written under an id of its own, so the event's own id stays unprocessed for that redrive.
        """
        carried = self._workflows.versions(saga.workflow_id)
        reason = (
            f"workflow {saga.workflow_id!r} version {saga.workflow_version!r} is not loaded here"
            f" (this orchestrator carries {carried or 'no version of it'})"
        )
        # Only a consumed message becomes a dead letter; a timer's outcome is read by no one.
        outcome.problem, outcome.detail = codec.UNKNOWN_VERSION, reason
        transition = park(saga, reason, now, self.topics)
        if not transition.changed:
            return None
        assert transition.saga is not None
        self._log.warning("saga %r parked: %s", saga.transaction_id, reason)
        sagas[saga.transaction_id] = transition.saga
        return TransitionWrite(
            f"park:{saga.transaction_id}:{saga.run_id}:{saga.version}",
            saga.transaction_id,
            saga.version,
            transition.saga,
            self._outbox(transition),
        )

    def _outbox(self, transition: Transition) -> tuple[OutboxMessage, ...]:
        saga = transition.saga
        key = saga.transaction_id if saga else ""
        if saga is None or not self.telemetry.tracing:
            return tuple([OutboxMessage(o.topic, key, o.encode()) for o in transition.outgoing])
        return tuple(
            OutboxMessage(
                o.topic,
                key,
                o.encode(),
                self.telemetry.dispatched(saga.traceparent, o.payload, o.topic)
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
            self.telemetry.result_taken(
                headers,
                saga.traceparent,
                saga.transaction_id,
                event.body.step,
                event.body.status,
                outcome.latency,
            )
        body = transition.outgoing[-1].payload["body"]  # an applied transition's audit record comes last
        self.telemetry.transition(
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


def _tx_of(event: Event) -> str:
    return event.timer.transaction_id if isinstance(event, TimerFired) else event.transaction_id
