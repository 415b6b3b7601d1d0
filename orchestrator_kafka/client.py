""":class:`SagaClient`: start, cancel and inspect sagas from any service, without running an orchestrator."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from . import codec
from .checks import check_context, check_id
from .constants import DEFAULT_TOPIC_PREFIX, Topics
from .context import SagaContext
from .errors import EventBusError, StateStoreError, ValidationError, WorkflowExecutionError
from .models import CancelBody, CancelSaga, StartBody, StartSaga, derived_event_id
from .paging import DEFAULT_PAGE_LIMIT
from .ports import IEventBus, IStateStore, OutboxMessage
from .telemetry import context_headers


class SagaClient:
    """Publishes start and cancel requests to the start topic, where the orchestrators consume them, and
    reads sagas from the state store. The bus (and the store) belong to the caller, who starts and stops
    them; either may be None when only the other is used (``topic_prefix`` then names the topics).

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

    async def start_saga(
        self, workflow_id: str, context: dict[str, Any], *, transaction_id: str | None = None
    ) -> str:
        """Ask for a saga of ``workflow_id`` on ``context``; return its transaction id. A given
        ``transaction_id`` is an idempotency key: a second request with it starts nothing.

        Raises:
            ValidationError: a bad workflow id, transaction id or context.
            EventBusError: the request could not be published.
        """
        check_id("workflow_id", workflow_id)
        data = check_context(context)
        tx = check_id("transaction_id", transaction_id) if transaction_id is not None else str(uuid.uuid4())
        request = StartSaga(
            event_id=derived_event_id(f"start:{tx}"),  # the same for a repeated request: deduplicated
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

    async def _publish(self, request: StartSaga | CancelSaga) -> None:
        if self._bus is None:
            raise EventBusError("this SagaClient was made without an event bus")
        message = OutboxMessage(
            self.topics.start, request.transaction_id, codec.encode(request), context_headers()
        )
        await self._bus.publish([message])

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
