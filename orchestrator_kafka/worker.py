"""The Worker SDK: handlers for step and compensation commands, results back to the orchestrator.

A worker subscribes to ``<prefix>.commands.<name>`` and ``<prefix>.compensations.<name>`` for every
registered name, one consumer per name so a slow handler never holds up another name's. Each consumed
batch runs its handlers concurrently (at most ``concurrency`` at once per name), publishes their results
together and only then lets the bus commit the offsets: a crash re-runs the batch, and commands already
handled are answered from a window of recent results instead of being run again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from operator import length_hint
from typing import Any

import orjson

from . import codec
from .constants import WORKER_GROUP, Topics
from .dead_letters import dead_letter
from .errors import DecodeError, NonRetryableError, ValidationError
from .lifecycle import Service
from .models import ERROR_TYPE_MAX, StepCommand, step_result_bytes
from .ports import Headers, IEventBus, ILogger, InboundMessage, OutboxMessage, Subscription
from .telemetry import Telemetry
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


class Worker(Service):
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
        self._results_topic = self.topics.results
        self._handlers: dict[str, Handler] = {}
        # Whether each handler is a coroutine function, decided once rather than per command.
        self._is_async: dict[str, bool] = {}
        self._concurrency = concurrency
        self._window = dedupe_window
        self._max_batch = max_batch
        self._done: OrderedDict[str, OutboxMessage] = OrderedDict()
        self._telemetry = Telemetry("worker")
        self._trace_headers: dict[str, Headers] = {}
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
        self._is_async[worker_name] = inspect.iscoroutinefunction(fn)

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
        self._telemetry = Telemetry("worker")  # now that the application's providers are installed
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

    async def _on_batch(self, name: str, limit: asyncio.Semaphore, batch: Sequence[InboundMessage]) -> None:
        out: list[OutboxMessage] = []
        todo: list[StepCommand] = []
        seen: set[str] = set()
        done = self._done
        for message in batch:
            try:
                command = codec.decode_command_first(message.value)
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
            if cid in done:
                # Already handled: answer again (the first answer may be what was lost), run nothing.
                out.append(done[cid])
            elif cid not in seen:
                seen.add(cid)
                todo.append(command)
                if self._telemetry.tracing:
                    self._trace_headers[cid] = message.headers

        results = await self._run_all(name, limit, todo) if todo else []
        out.extend(results)
        if out:
            await self._bus.publish(out)
        for command, result in zip(todo, results, strict=True):
            done[command.body.command_id] = result
        while len(done) > self._window:
            done.popitem(last=False)

    async def _run_all(
        self, name: str, limit: asyncio.Semaphore, todo: list[StepCommand]
    ) -> list[OutboxMessage]:
        """Run ``todo``'s handlers, at most ``concurrency`` (and ``limit``) at once, results in order.

        A lane runs commands one after another and holds one of ``limit``'s permits meanwhile. The
        batch's own task is the first lane: a handler that returns without waiting costs no task. The
        other lanes start, as tasks, only once a handler in hand waits for something (that is, yields to
        the loop), and then take the commands not yet started, so the batch still runs concurrently.
        """
        run = self._run
        if len(todo) == 1:
            async with limit:
                return [await run(name, todo[0])]
        results: list[OutboxMessage | None] = [None] * len(todo)
        pending = iter(range(len(todo)))

        async def lane() -> None:
            # A lane holds one of ``limit``'s permits while it runs commands one after another.
            async with limit:
                for i in pending:  # shared by all lanes: each command is taken once
                    results[i] = await run(name, todo[i])

        loop = asyncio.get_running_loop()
        lanes: list[asyncio.Task[None]] = []

        def spawn() -> None:
            for _ in range(min(length_hint(pending), self._concurrency - 1)):
                lanes.append(loop.create_task(lane()))

        spawner = loop.call_soon(spawn) if self._concurrency > 1 else None
        try:
            await lane()
            if spawner is not None:
                spawner.cancel()  # nothing waited, so nothing needed another lane
            if lanes:
                await asyncio.gather(*lanes)
        except BaseException:
            if spawner is not None:
                spawner.cancel()
            for task in lanes:
                task.cancel()
            raise
        return results  # type: ignore[return-value]  # every index was filled

    def _dead(self, message: InboundMessage, reason: str, detail: str) -> OutboxMessage:
        self._telemetry.dead_letter(reason, message.topic)
        self._log.warning("dead letter from %s@%d: %s (%s)", message.topic, message.offset, reason, detail)
        return dead_letter(message, self.topics.dlq, reason, detail)

    async def _run(self, name: str, command: StepCommand) -> OutboxMessage:
        if not self._telemetry.tracing:
            return await self._execute(name, command)
        body = command.body
        attributes = {
            "saga.transaction_id": command.transaction_id,
            "saga.workflow_id": command.workflow_id,
            "saga.step": body.step,
            "saga.kind": body.kind,
            "saga.attempt": body.attempt,
        }
        headers = self._trace_headers.pop(body.command_id, ())
        with self._telemetry.handling(name, headers, attributes) as reply_headers:
            reply = await self._execute(name, command)
        return dataclasses.replace(reply, headers=reply_headers)

    async def _execute(self, name: str, command: StepCommand) -> OutboxMessage:
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
        fn, is_async = self._handlers[name], self._is_async[name]
        timeout = body.timeout
        error: tuple[str, str, bool] | None = None
        try:
            if timeout is None:
                outcome = await fn(ctx) if is_async else await _call_plain(fn, ctx)  # type: ignore[misc]
            else:
                # The orchestrator gives up on the attempt at its timeout; so does the worker, so a hung
                # handler cannot hold up the commands behind it for longer than that.
                deadline = asyncio.timeout(timeout)
                async with deadline:
                    outcome = await fn(ctx) if is_async else await _call_plain(fn, ctx)  # type: ignore[misc]
        except NonRetryableError as exc:
            error = (_error_type(exc), str(exc), False)
        except TimeoutError as exc:
            expired = timeout is not None and deadline.expired()
            error = ("TimeoutError", f"handler timed out after {timeout:g}s" if expired else str(exc), True)
        except Exception as exc:  # noqa: BLE001 - a handler's failure becomes a failed result
            error = (_error_type(exc), str(exc), True)
        else:
            if outcome is None:
                return self._reply(command, _EMPTY)
            if not isinstance(outcome, dict):
                error = (
                    "TypeError",
                    f"handler returned {type(outcome).__name__}, expected a dict or None",
                    False,
                )
            else:
                try:
                    return self._reply(command, outcome)
                except TypeError:
                    # Only what the result alone cannot encode fails it; the envelope's two levels of
                    # nesting must not (orjson stops at 254 levels).
                    try:
                        fragment = orjson.Fragment(orjson.dumps(outcome))
                    except TypeError as exc:
                        error = ("TypeError", f"handler result is not JSON-serialisable: {exc}", False)
                    else:
                        return self._reply(command, fragment)
        self._log.info(
            "%s %s of %s failed: %s: %s", name, body.kind, command.transaction_id, error[0], error[1]
        )
        return self._reply(command, None, error)

    def _reply(
        self,
        command: StepCommand,
        result: dict[str, Any] | orjson.Fragment | None,
        error: tuple[str, str, bool] | None = None,
    ) -> OutboxMessage:
        """The :class:`StepResult` of ``command``, as :func:`models.step_result_bytes` writes it.

        Raises:
            TypeError: ``result`` is not JSON-serialisable.
        """
        value = step_result_bytes(command, result, error)
        return OutboxMessage(self._results_topic, command.transaction_id, value)


_EMPTY: dict[str, Any] = {}


def _error_type(exc: BaseException) -> str:
    return type(exc).__name__[:ERROR_TYPE_MAX]


async def _call_plain(fn: Handler, ctx: StepContext) -> object:
    outcome = await asyncio.to_thread(fn, ctx)
    if inspect.isawaitable(outcome):
        return await outcome
    return outcome
