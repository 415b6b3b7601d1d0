""":class:`SagaClient`: start, cancel, repair and inspect sagas from any service, without running an
orchestrator."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import pydantic

from . import codec
from .checks import check_context, check_id
from .constants import DEFAULT_TOPIC_PREFIX, Topics
from .context import SagaContext, WorkflowState
from .errors import EventBusError, StateStoreError, ValidationError, WorkflowExecutionError
from .models import (
    CancelBody,
    CancelSaga,
    RepairAction,
    RepairBody,
    RepairSaga,
    StartBody,
    StartSaga,
)
from .paging import DEFAULT_PAGE_LIMIT
from .ports import IEventBus, IStateStore, OutboxMessage
from .redrive import DeadLetter, Redrive, letters_of, plan, select
from .repair import refusal
from .telemetry import context_headers
from .waiting import Waiters

_PAGE = 500  # statuses per page when counting versions
_log = logging.getLogger("orchestrator_kafka.client")


class SagaClient:
    """Publishes start, cancel and repair requests to the start topic, where the orchestrators consume
    them, and reads sagas from the state store. The bus (and the store) belong to the caller, who
    starts and stops them; either may be None when only the other is used (``topic_prefix`` then names
    the topics).

    A request is asynchronous: :meth:`start_saga` returns once the request is on the topic, and the saga
    exists once an orchestrator has taken it. Each request carries the caller's trace context, so the
    saga's spans join the caller's trace.
    """

    def __init__(
        self,
        event_bus: IEventBus | None,
        state_store: IStateStore | None = None,
        *,
        topic_prefix: str | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._bus = event_bus
        self._store = state_store
        self._clock = clock
        prefix = topic_prefix or (event_bus.topic_prefix if event_bus is not None else DEFAULT_TOPIC_PREFIX)
        self.topics = Topics(prefix)
        self._waiters: Waiters | None = None

    async def start_saga(
        self, workflow_id: str, context: dict[str, Any], *, transaction_id: str | None = None
    ) -> str:
        """Ask for a saga of ``workflow_id`` on ``context``; return its transaction id. A given
        ``transaction_id`` is an idempotency key: a second request with it starts nothing while the saga
        is kept (see the store's retention); once it is deleted or expired, a request starts a new saga.

        Raises:
            ValidationError: a bad workflow id, transaction id or context.
            EventBusError: the request could not be published.
        """
        check_id("workflow_id", workflow_id)
        data = check_context(context)
        tx = check_id("transaction_id", transaction_id) if transaction_id is not None else str(uuid.uuid4())
        request = StartSaga(
            # A request of its own: a repeated one is recognised by its saga, which exists; an id derived
            # from the transaction id would make a start after the saga was deleted a duplicate.
            event_id=str(uuid.uuid4()),
            transaction_id=tx,
            workflow_id=workflow_id,
            occurred_at=self._clock(),
            body=StartBody(context=data),
        )
        await self._publish(request)
        return tx

    async def cancel_saga(self, transaction_id: str, reason: str | None = None) -> None:
        """Ask for a pending or running saga to be cancelled (compensated, then ``cancelled``).

        Raises:
            ValueError: no such saga.
            WorkflowExecutionError: the saga is compensating or has ended.
            StateStoreError, EventBusError: a backend failed.
        """
        saga = await self._load(transaction_id)
        if saga.state.is_final or saga.state.value == "compensating":
            raise WorkflowExecutionError(f"cannot cancel {transaction_id!r}: it is {saga.state.value}")
        request = CancelSaga(
            event_id=str(uuid.uuid4()),
            transaction_id=transaction_id,
            workflow_id=saga.workflow_id,
            occurred_at=self._clock(),
            body=CancelBody(reason=reason or "cancelled by request"),
        )
        await self._publish(request)

    async def retry(
        self,
        transaction_id: str,
        *,
        step: str | None = None,
        reason: str | None = None,
        request_id: str | None = None,
    ) -> str:
        """Repair a saga by retrying it: a ``failed`` saga's failed compensations are sent again, one more
        attempt each, and its rollback goes on (it is ``compensating`` until it ends); on a saga that is
        not failed, each command it awaits is sent again as it was, and each attempt waiting to be
        retried is sent now. ``step`` limits the retry to that step. Returns the request's id
        (``request_id``, or a new one): a request sent again with it is applied once.

        Like every repair, the request goes to the start topic and the orchestrator that owns the saga
        decides it, checks it against the saga as it is then, and records it in the saga's audit.

        Raises:
            ValueError: no such saga.
            ValidationError: a malformed id or step name.
            WorkflowExecutionError: there is nothing to retry (the message says why).
            StateStoreError, EventBusError: a backend failed.
        """
        return await self._repair("retry", transaction_id, step, reason, request_id)

    async def skip_compensation(
        self, transaction_id: str, step: str, reason: str, *, request_id: str | None = None
    ) -> str:
        """Repair a saga by counting the compensation of ``step`` (failed for good, or stuck) as done by
        hand, for ``reason``: its rollback goes on, and a ``failed`` saga with nothing else failed ends as
        its rollback would have (``compensated`` or ``cancelled``). Returns the request's id.

        Raises:
            ValueError: no such saga.
            ValidationError: a malformed id or step name, or an empty reason.
            WorkflowExecutionError: the step has no compensation failed or under way.
            StateStoreError, EventBusError: a backend failed.
        """
        if not reason:
            raise ValidationError("skip_compensation needs a reason, for the audit")
        return await self._repair("skip_compensation", transaction_id, step, reason, request_id)

    async def force_cancel(
        self, transaction_id: str, reason: str | None = None, *, request_id: str | None = None
    ) -> str:
        """Cancel a saga that a plain cancel refuses because it is ``compensating``, such as one waiting
        for a parallel step whose worker is gone: it stops waiting, the steps in flight are compensated
        first (their outcome is unknown), then the rest, and it ends ``cancelled``. On a pending or
        running saga it is a cancel. Returns the request's id.

        Raises:
            ValueError: no such saga.
            WorkflowExecutionError: the saga has ended.
            StateStoreError, EventBusError: a backend failed.
        """
        return await self._repair("force_cancel", transaction_id, None, reason, request_id)

    async def _repair(
        self,
        action: RepairAction,
        transaction_id: str,
        step: str | None,
        reason: str | None,
        request_id: str | None,
    ) -> str:
        if step is not None:
            check_id("step", step)
        saga = await self._load(transaction_id)
        try:
            body = RepairBody(action=action, run_id=saga.run_id or None, step=step, reason=reason)
        except pydantic.ValidationError as exc:  # a reason too long, say: one line of the error tree's
            raise ValidationError(f"a bad {action} request: {exc.errors()[0]['msg']}") from None
        refused = refusal(saga, body)
        if refused is not None:
            raise WorkflowExecutionError(f"cannot {action} {transaction_id!r}: {refused}")
        request = RepairSaga(
            event_id=check_id("request_id", request_id) if request_id is not None else str(uuid.uuid4()),
            transaction_id=transaction_id,
            workflow_id=saga.workflow_id,
            occurred_at=self._clock(),
            body=body,
        )
        await self._publish(request)
        return request.event_id

    async def get_status(self, transaction_id: str) -> dict[str, Any]:
        """The saga's status, as ``Orchestrator.get_status`` gives it.

        Raises:
            ValueError: no such saga.
            StateStoreError: the store failed or none was given.
        """
        return (await self._load(transaction_id)).to_status()

    async def list_sagas(
        self,
        workflow_id: str | None = None,
        state: str | None = None,
        *,
        limit: int = DEFAULT_PAGE_LIMIT,
        cursor: str | None = None,
        updated_after: datetime | None = None,
        updated_before: datetime | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of the statuses of the sagas of ``workflow_id`` in ``state`` (None matches any)
        whose state last changed after ``updated_after`` and before ``updated_before``, oldest change
        first, and the cursor of the next page (None: the last page). Pass the cursor back for the next
        page; a page costs the same however many sagas exist.

        Raises:
            ValidationError: an unknown state, a malformed cursor, a limit out of 1 to 10,000, or a
                bound without a time zone.
            StateStoreError: the store failed or none was given.
        """
        return await self._require_store().list_sagas(
            workflow_id,
            state,
            limit=limit,
            cursor=cursor,
            updated_after=updated_after,
            updated_before=updated_before,
        )

    async def wait_for(
        self,
        transaction_id: str,
        timeout: float | None = None,  # noqa: ASYNC109 - the signature issue 13 asks for
    ) -> dict[str, Any]:
        """The saga's final status (as :meth:`get_status` gives it) once it has ended; at once when it
        has already. A saga not recorded yet (its start request still on its way) is waited for too.
        Every waiter of this client is served by one watch of the audit topic; no waiter polls.

        Raises:
            TimeoutError: ``timeout`` seconds passed first (None: no limit).
            ValueError: a malformed transaction id.
            EventBusError: the client has no bus, or the bus stopped while waiting.
            StateStoreError: the client has no store, or the store failed.
        """
        try:
            check_id("transaction_id", transaction_id)
        except ValidationError as exc:
            raise ValueError(str(exc)) from None
        if self._waiters is None:
            bus, store = self._require_bus(), self._require_store()
            self._waiters = Waiters(bus, store.load_context, self.topics.events, _log)
        return await self._waiters.wait_for(transaction_id, timeout)

    async def close(self) -> None:
        """Stop the watch that serves :meth:`wait_for` (failing any waiter); idempotent. The bus and the
        store stay the caller's."""
        if self._waiters is not None:
            await self._waiters.close("the SagaClient was closed before the saga ended")
            self._waiters = None

    async def versions_in_flight(self, workflow_id: str | None = None) -> list[dict[str, Any]]:
        """The sagas not yet ended, counted by workflow and version: once a version has none, no
        orchestrator needs to carry it any more. Each row has ``workflow_id``, ``workflow_version``
        (empty for sagas stored before versions), ``in_flight`` and ``parked`` (how many of them wait
        for an orchestrator that carries their version), sorted by workflow and version.

        Raises:
            StateStoreError: the store failed or none was given.
        """
        store = self._require_store()
        counts: dict[tuple[str, str], list[int]] = {}
        for state in WorkflowState:
            if state.is_final:
                continue
            # Page by page, so that a million sagas in flight are never one reply.
            cursor: str | None = None
            while True:
                page, cursor = await store.list_sagas(workflow_id, state.value, limit=_PAGE, cursor=cursor)
                for status in page:
                    row = counts.setdefault((status["workflow_id"], status["workflow_version"]), [0, 0])
                    row[0] += 1
                    row[1] += status["parked"] is not None
                if cursor is None:
                    break
        return [
            {"workflow_id": wf, "workflow_version": version, "in_flight": n, "parked": parked}
            for (wf, version), (n, parked) in sorted(counts.items())
        ]

    async def dead_letters(
        self, *, reason: str | None = None, transaction_id: str | None = None
    ) -> list[DeadLetter]:
        """The dead letters on the dead-letter topic (with ``reason``, and the key ``transaction_id``, when
        given), in the topic's order within each partition; each says whether a redrive sent it back.

        Raises:
            EventBusError: the topic cannot be read, or no bus was given.
        """
        letters = await self._letters()
        if reason is None and transaction_id is None:
            return letters
        return select(letters, reason=reason, transaction_id=transaction_id)

    async def redrive(
        self,
        *,
        positions: Sequence[str] = (),
        reason: str | None = None,
        transaction_id: str | None = None,
        request_id: str | None = None,
        dry_run: bool = False,
    ) -> Redrive:
        """Send the dead letters that match every criterion given (``positions`` as ``<partition>:<offset>``
        on the dead-letter topic, ``reason``, ``transaction_id``) back to the topics they came from, each
        once, and mark them on the dead-letter topic as sent back; with ``dry_run``, only say what would
        be. A letter sent back before, or whose value was cut to fit the dead-letter topic, is refused
        (the report says why). See :mod:`orchestrator_kafka.redrive`.

        Raises:
            ValidationError: no criterion, or a malformed position.
            EventBusError: the dead-letter topic cannot be read or a publish failed (what was published
                before the failure may be sent again by the next redrive: harmless, see the module).
        """
        chosen = select(
            await self._letters(), positions=positions, reason=reason, transaction_id=transaction_id
        )
        copies, markers, report = plan(chosen, self.topics.dlq, request_id or str(uuid.uuid4()))
        if not dry_run and copies:
            # The copies first: a letter is marked sent back only once it is.
            await self._require_bus().publish(copies)
            await self._require_bus().publish(markers)
        return report

    async def _letters(self) -> list[DeadLetter]:
        """Every dead letter on the dead-letter topic, marked with the redrive that sent it back."""
        return letters_of([m async for m in self._require_bus().read(self.topics.dlq)])

    def _require_bus(self) -> IEventBus:
        if self._bus is None:
            raise EventBusError("this SagaClient was made without an event bus")
        return self._bus

    async def _publish(self, request: StartSaga | CancelSaga | RepairSaga) -> None:
        message = OutboxMessage(
            self.topics.start, request.transaction_id, codec.encode(request), context_headers()
        )
        await self._require_bus().publish([message])

    async def _load(self, transaction_id: str) -> SagaContext:
        try:
            check_id("transaction_id", transaction_id)
        except ValidationError as exc:
            raise ValueError(str(exc)) from None
        saga = await self._require_store().load_context(transaction_id)
        if saga is None:
            raise ValueError(f"unknown transaction id {transaction_id!r}")
        return saga

    def _require_store(self) -> IStateStore:
        if self._store is None:
            raise StateStoreError("this SagaClient was made without a state store")
        return self._store
