"""The Worker SDK: handlers for step and compensation commands, results back to the orchestrator.

A worker subscribes to ``<prefix>.commands.<name>`` and ``<prefix>.compensations.<name>`` for every
registered name, one consumer per name so a slow handler never holds up another name's. Each consumed
batch runs its handlers concurrently (at most ``concurrency`` at once per name), publishes their results
together and only then lets the bus commit the offsets: a crash re-runs the batch, and commands already
handled are answered from a window of recent results instead of being run again.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import orjson

from . import codec
from .constants import WORKER_GROUP, Topics
from .errors import DecodeError, NonRetryableError, ValidationError
from .models import ErrorInfo, ResultBody, StepCommand, StepResult
from .orchestrator import dead_letter
from .ports import IEventBus, ILogger, InboundMessage, OutboxMessage, Subscription
from .workflow import _check_name

Handler = Callable[["StepContext"], Awaitable[dict[str, Any] | None] | dict[str, Any] | None]


@dataclass(frozen=True, slots=True)
class StepContext:
    """What a handler is told about the command it runs."""

    transaction_id: str
    workflow_id: str
    step: str
    worker_name: str
    attempt: int
    data: dict[str, Any]
    is_compensation: bool
    command_id: str

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` in the saga's data at dispatch, or ``default``."""
        return self.data.get(key, default)


class Worker:
    """Runs step handlers for commands consumed from the event bus.

    A handler is ``async def fn(ctx: StepContext) -> dict | None`` or a plain function (run in a
    thread). The returned dict is the step's result. :class:`NonRetryableError` fails the step at
    once; any other exception is a retryable failure carrying the exception's type and message. A
    handler still running at its step's timeout is cancelled (a thread is abandoned) and the attempt
    fails with ``TimeoutError``.
    """

    def __init__(
        self,
        event_bus: IEventBus,
        *,
        concurrency: int = 64,
        dedupe_window: int = 10_000,
        logger: ILogger | None = None,
        max_batch: int = 500,
    ) -> None:
        if concurrency < 1:
            raise ValidationError(f"concurrency must be >= 1, got {concurrency}")
        self._bus = event_bus
        self.topics = Topics(event_bus.topic_prefix)
        self._handlers: dict[str, Handler] = {}
        self._concurrency = concurrency
        self._window = dedupe_window
        self._max_batch = max_batch
        self._done: OrderedDict[str, OutboxMessage] = OrderedDict()
        self._log: ILogger = logger or logging.getLogger("orchestrator_kafka.worker")
        self._subscriptions: list[Subscription] = []
        self._started = False

    def register(self, worker_name: str, fn: Handler) -> None:
        """Handle the commands of ``worker_name`` with ``fn``.

        Raises:
            ValidationError: a bad name, a name already registered, ``fn`` not callable, or the worker
                already started.
        """
        _check_name("worker_name", worker_name)
        if not callable(fn):
            raise ValidationError(f"the handler of {worker_name!r} must be callable, got {fn!r}")
        if worker_name in self._handlers:
            raise ValidationError(f"a handler for {worker_name!r} is registered already")
        if self._started:
            raise ValidationError("register handlers before the worker starts")
        self._handlers[worker_name] = fn

    def handler(self, worker_name: str) -> Callable[[Handler], Handler]:
        """Decorator form of :meth:`register`."""

        def wrap(fn: Handler) -> Handler:
            self.register(worker_name, fn)
            return fn

        return wrap

    @property
    def worker_names(self) -> list[str]:
        return sorted(self._handlers)

    async def start(self) -> None:
        """Subscribe to every registered name's command topics; idempotent.

        Raises:
            ValidationError: no handler is registered.
            EventBusError: the bus could not be reached.
        """
        if self._started:
            return
        if not self._handlers:
            raise ValidationError("register at least one handler before starting the worker")
        await self._bus.start()
        await self._bus.ensure_topics([self.topics.results, self.topics.dlq])
        for name in sorted(self._handlers):
            limit = asyncio.Semaphore(self._concurrency)

            async def on_batch(
                batch: Sequence[InboundMessage], name: str = name, limit: asyncio.Semaphore = limit
            ) -> None:
                await self._on_batch(name, limit, batch)

            self._subscriptions.append(
                await self._bus.subscribe(
                    [self.topics.commands(name), self.topics.compensations(name)],
                    self.topics.group(f"{WORKER_GROUP}.{name}"),
                    on_batch,
                    max_batch=self._max_batch,
                )
            )
        self._started = True

    async def stop(self) -> None:
        """Stop consuming after the batches in hand; idempotent."""
        subscriptions, self._subscriptions = self._subscriptions, []
        for subscription in subscriptions:
            await subscription.stop()
        self._started = False

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def _on_batch(self, name: str, limit: asyncio.Semaphore, batch: Sequence[InboundMessage]) -> None:
        out: list[OutboxMessage] = []
        todo: list[StepCommand] = []
        seen: set[str] = set()
        for message in batch:
            try:
                command = codec.decode(message.value)
            except DecodeError as exc:
                out.append(self._dead(message, exc.reason, exc.detail))
                continue
            if not isinstance(command, StepCommand) or command.body.worker_name != name:
                what = (
                    command.event_type if not isinstance(command, StepCommand) else command.body.worker_name
                )
                out.append(self._dead(message, codec.UNEXPECTED_EVENT_TYPE, f"{what} on {message.topic}"))
                continue
            cid = command.body.command_id
            if cid in self._done:
                # Already handled: answer again (the first answer may be what was lost), run nothing.
                out.append(self._done[cid])
            elif cid not in seen:
                seen.add(cid)
                todo.append(command)

        async def run(command: StepCommand) -> OutboxMessage:
            async with limit:
                return await self._run(name, command)

        results = await asyncio.gather(*(run(c) for c in todo))
        out.extend(results)
        if out:
            await self._bus.publish(out)
        for command, result in zip(todo, results, strict=True):
            self._done[command.body.command_id] = result
        while len(self._done) > self._window:
            self._done.popitem(last=False)

    def _dead(self, message: InboundMessage, reason: str, detail: str) -> OutboxMessage:
        self._log.warning("dead letter from %s@%d: %s (%s)", message.topic, message.offset, reason, detail)
        return dead_letter(message, self.topics.dlq, reason, detail)

    async def _run(self, name: str, command: StepCommand) -> OutboxMessage:
        body = command.body
        ctx = StepContext(
            transaction_id=command.transaction_id,
            workflow_id=command.workflow_id,
            step=body.step,
            worker_name=name,
            attempt=body.attempt,
            data=dict(body.data),
            is_compensation=body.kind == "compensate",
            command_id=body.command_id,
        )
        error: ErrorInfo | None = None
        result: dict[str, Any] | None = None
        try:
            # The orchestrator gives up on the attempt at its timeout; so does the worker, so a hung
            # handler cannot hold up the commands behind it for longer than that.
            deadline = asyncio.timeout(body.timeout)
            async with deadline:
                outcome = await _call(self._handlers[name], ctx)
            if outcome is None:
                result = {}
            elif not isinstance(outcome, dict):
                error = ErrorInfo(
                    type="TypeError",
                    message=f"handler returned {type(outcome).__name__}, expected a dict or None",
                    retryable=False,
                )
            else:
                try:
                    result = orjson.loads(orjson.dumps(outcome))
                except TypeError as exc:
                    error = ErrorInfo(
                        type="TypeError",
                        message=f"handler result is not JSON-serialisable: {exc}",
                        retryable=False,
                    )
        except NonRetryableError as exc:
            error = ErrorInfo(type=_error_type(exc), message=str(exc)[:10_000], retryable=False)
        except TimeoutError as exc:
            message = f"handler timed out after {body.timeout:g}s" if deadline.expired() else str(exc)
            error = ErrorInfo(type="TimeoutError", message=message[:10_000])
        except Exception as exc:  # noqa: BLE001 - a handler's failure becomes a failed result
            error = ErrorInfo(type=_error_type(exc), message=str(exc)[:10_000], retryable=True)
        if error is not None:
            self._log.info(
                "%s %s of %s failed: %s: %s",
                name,
                body.kind,
                command.transaction_id,
                error.type,
                error.message,
            )
        reply = StepResult(
            event_id=str(uuid.uuid4()),
            transaction_id=command.transaction_id,
            workflow_id=command.workflow_id,
            occurred_at=datetime.now(UTC),
            body=ResultBody(
                command_id=body.command_id,
                step=body.step,
                kind=body.kind,
                attempt=body.attempt,
                status="failed" if error else "succeeded",
                result=None if error else result,
                error=error,
            ),
        )
        return OutboxMessage(self.topics.results, command.transaction_id, codec.encode(reply))


def _error_type(exc: BaseException) -> str:
    return type(exc).__name__[:500]


async def _call(fn: Handler, ctx: StepContext) -> object:
    if inspect.iscoroutinefunction(fn):
        return await fn(ctx)
    outcome = await asyncio.to_thread(fn, ctx)
    if inspect.isawaitable(outcome):
        return await outcome
    return outcome
