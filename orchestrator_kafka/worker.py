"""The Worker SDK: handlers for step and compensation commands, results back to the orchestrator.

A worker consumes ``<prefix>.commands.<name>`` and ``<prefix>.compensations.<name>`` for every registered
name, one consumer per name so a slow handler never holds up another name's. Each command runs as its own
task as soon as one of the name's ``concurrency`` slots is free, whatever is slow beside it
(:meth:`IEventBus.consume`, DESIGN section 10); its result is published as soon as it finishes, gathered
with the others finishing meanwhile into one publish. The bus commits each partition's offset up to the
first command whose result is not yet published, so a crash re-delivers only those and the ones behind
them, and commands already handled are answered from a window of recent results instead of being run
again.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import functools
import inspect
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import orjson

from . import codec
from .coalescing import CoalescingPublisher
from .constants import WORKER_GROUP, Topics
from .dead_letters import dead_letter
from .errors import DecodeError, NonRetryableError, ValidationError
from .lifecycle import Service
from .models import ERROR_TYPE_MAX, StepCommand, step_result_bytes
from .ports import Handled, Headers, IEventBus, ILogger, InboundMessage, OutboxMessage, Subscription
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

    A handler is ``async def fn(ctx: StepContext) -> dict | None`` or a plain function (run on the
    worker's own thread pool, one thread per slot, so plain handlers never queue behind each other or
    behind the event loop's default pool). The returned dict is the step's result.
    :class:`NonRetryableError` fails the step at once; any other exception is a retryable failure
    carrying the exception's type and message. A handler still running at its step's timeout fails the
    attempt with ``TimeoutError`` at once: a coroutine is cancelled; a thread cannot be, so it keeps its
    slot until it returns (a log line says so).

    Each registered name gets ``concurrency`` slots: at most that many of its handlers run at once. On a
    rebalance, and on :meth:`stop`, the handlers of the partitions given up get ``grace`` seconds to
    finish; those still running then are cancelled and their commands delivered again (logged).
    """

    def __init__(
        self,
        event_bus: IEventBus,
        *,
        concurrency: int = 64,
        dedupe_window: int = 10_000,
        logger: ILogger | None = None,
        grace: float = 30.0,
    ) -> None:
        if concurrency < 1:
            raise ValidationError(f"concurrency must be >= 1, got {concurrency}")
        if grace < 0:
            raise ValidationError(f"grace must not be negative, got {grace}")
        self._bus = event_bus
        self.topics = Topics(event_bus.topic_prefix)
        self._results_topic = self.topics.results
        self._handlers: dict[str, Handler] = {}
        # Whether each handler is a coroutine function, decided once rather than per command.
        self._is_async: dict[str, bool] = {}
        self._concurrency = concurrency
        self._grace = grace
        self._window = dedupe_window
        # The results of the last ``dedupe_window`` commands, and the ids of those running now.
        self._done: OrderedDict[str, OutboxMessage] = OrderedDict()
        self._running: set[str] = set()
        self._publisher = CoalescingPublisher(event_bus)
        self._threads: ThreadPoolExecutor | None = None
        self._telemetry = Telemetry("worker")
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
        """Consume every registered name's command topics; idempotent.

        Raises:
            ValidationError: no handler is registered.
            EventBusError: the bus could not be reached, or cannot consume one message at a time.
        """
        if self._started:
            return
        if not self._handlers:
            raise ValidationError("register at least one handler before starting the worker")
        await self._bus.start()
        self._telemetry = Telemetry("worker")  # now that the application's providers are installed
        await self._bus.ensure_topics([self.topics.results, self.topics.dlq])
        if any(not is_async for is_async in self._is_async.values()):
            # A thread per slot of every name: a plain handler never waits for a thread.
            self._threads = ThreadPoolExecutor(
                max_workers=self._concurrency * len(self._handlers), thread_name_prefix="saga-worker"
            )
        try:
            for name in sorted(self._handlers):
                self._subscriptions.append(
                    await self._bus.consume(
                        [self.topics.commands(name), self.topics.compensations(name)],
                        self.topics.group(f"{WORKER_GROUP}.{name}"),
                        functools.partial(self._on_message, name),
                        concurrency=self._concurrency,
                        grace=self._grace,
                    )
                )
        except BaseException:
            await self.stop()
            raise
        self._started = True

    async def stop(self) -> None:
        """Stop consuming: the handlers running get the grace period, their results are published and
        their offsets committed; idempotent."""
        subscriptions, self._subscriptions = self._subscriptions, []
        # Together: each drains for up to the grace period.
        await asyncio.gather(*(subscription.stop() for subscription in subscriptions))
        threads, self._threads = self._threads, None
        if threads is not None:
            # A thread past its timeout cannot be stopped; it is not waited for.
            threads.shutdown(wait=False, cancel_futures=True)
        self._started = False

    async def _on_message(self, name: str, message: InboundMessage) -> Handled | None:
        """Handle one consumed message: run its command (or answer it from the window) and hand the
        result to the publisher; a slot of the bus's. The message is done once the result is published;
        the slot is free once the handler returned, unless a plain handler's thread is still running
        past its timeout."""
        try:
            command = codec.decode_command_first(message.value)
        except DecodeError as exc:
            return Handled(self._publisher.submit(self._dead(message, exc.reason, exc.detail)))
        if not isinstance(command, StepCommand) or command.body.worker_name != name:
            what = command.event_type if not isinstance(command, StepCommand) else command.body.worker_name
            return Handled(
                self._publisher.submit(
                    self._dead(message, codec.UNEXPECTED_EVENT_TYPE, f"{what} on {message.topic}")
                )
            )
        cid = command.body.command_id
        done = self._done
        answer = done.get(cid)
        if answer is not None:
            # Already handled: answer again (the first answer may be what was lost), run nothing.
            return Handled(self._publisher.submit(answer))
        if cid in self._running:
            # A copy is running now: it answers, and it holds its partition's watermark back till then.
            return None
        self._running.add(cid)
        try:
            answer, hold = await self._run(name, command, message.headers)
        except asyncio.CancelledError:
            self._log.warning(
                "%s: %s of %s cancelled before it finished (its partition was released or the worker "
                "stopped); it will be delivered again",
                name,
                cid,
                command.transaction_id,
            )
            raise
        finally:
            self._running.discard(cid)
        # Remembered before it is published: if the publish fails, the bus hands the message over
        # again and the answer is published without running the handler again.
        done[cid] = answer
        while len(done) > self._window:
            done.popitem(last=False)
        return Handled(self._publisher.submit(answer), hold)

    def _dead(self, message: InboundMessage, reason: str, detail: str) -> OutboxMessage:
        self._telemetry.dead_letter(reason, message.topic)
        self._log.warning("dead letter from %s@%d: %s (%s)", message.topic, message.offset, reason, detail)
        return dead_letter(message, self.topics.dlq, reason, detail)

    async def _run(
        self, name: str, command: StepCommand, headers: Headers
    ) -> tuple[OutboxMessage, Awaitable[None] | None]:
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
        with self._telemetry.handling(name, headers, attributes) as reply_headers:
            reply, hold = await self._execute(name, command)
        return dataclasses.replace(reply, headers=reply_headers), hold

    async def _execute(self, name: str, command: StepCommand) -> tuple[OutboxMessage, Awaitable[None] | None]:
        """The command's result, and what keeps its slot taken after (a thread past its timeout)."""
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
        fn = self._handlers[name]
        timeout = body.timeout
        error: tuple[str, str, bool] | None = None
        hold: Awaitable[None] | None = None
        try:
            if not self._is_async[name]:
                outcome = await self._in_thread(fn, ctx, timeout)
            elif timeout is None:
                outcome = await fn(ctx)  # type: ignore[misc]
            else:
                # The orchestrator gives up on the attempt at its timeout; so does the worker, so a hung
                # handler cannot hold its slot for longer than that.
                deadline = asyncio.timeout(timeout)
                async with deadline:
                    outcome = await fn(ctx)  # type: ignore[misc]
        except NonRetryableError as exc:
            error = (_error_type(exc), str(exc), False)
        except _PastTimeout as exc:
            error = ("TimeoutError", f"handler timed out after {timeout:g}s", True)
            hold = self._outlived(name, command, exc.thread)
        except TimeoutError as exc:
            expired = timeout is not None and self._is_async[name] and deadline.expired()
            error = ("TimeoutError", f"handler timed out after {timeout:g}s" if expired else str(exc), True)
        except Exception as exc:  # noqa: BLE001 - a handler's failure becomes a failed result
            error = (_error_type(exc), str(exc), True)
        else:
            if outcome is None:
                return self._reply(command, _EMPTY), hold
            if not isinstance(outcome, dict):
                error = (
                    "TypeError",
                    f"handler returned {type(outcome).__name__}, expected a dict or None",
                    False,
                )
            else:
                try:
                    return self._reply(command, outcome), hold
                except TypeError:
                    # Only what the result alone cannot encode fails it; the envelope's two levels of
                    # nesting must not (orjson stops at 254 levels).
                    try:
                        fragment = orjson.Fragment(orjson.dumps(outcome))
                    except TypeError as exc:
                        error = ("TypeError", f"handler result is not JSON-serialisable: {exc}", False)
                    else:
                        return self._reply(command, fragment), hold
        self._log.info(
            "%s %s of %s failed: %s: %s", name, body.kind, command.transaction_id, error[0], error[1]
        )
        return self._reply(command, None, error), hold

    async def _in_thread(self, fn: Handler, ctx: StepContext, limit: float | None) -> object:
        """Run a plain handler on the worker's threads, in the caller's context (its trace span).

        Raises:
            _PastTimeout: the thread is still running after ``limit`` seconds (the step's timeout); it
                carries the thread's future.
        """
        call = functools.partial(contextvars.copy_context().run, fn, ctx)
        thread = asyncio.get_running_loop().run_in_executor(self._threads, call)
        if limit is None:
            outcome = await thread
        else:
            finished, _ = await asyncio.wait({thread}, timeout=limit)
            if not finished:
                raise _PastTimeout(thread)
            outcome = thread.result()
        if inspect.isawaitable(outcome):
            outcome = await outcome
        return outcome

    def _outlived(self, name: str, command: StepCommand, thread: asyncio.Future[Any]) -> Awaitable[None]:
        """Say that a plain handler's thread outlived its step's timeout; the thread's future, which keeps
        the command's slot taken until the thread returns."""
        started = time.monotonic()
        self._log.warning(
            "%s: the thread running %s of %s is still busy at the step's %gs timeout: answered as timed "
            "out; it keeps its slot until it returns",
            name,
            command.body.command_id,
            command.transaction_id,
            command.body.timeout,
        )

        def returned(future: asyncio.Future[Any]) -> None:
            if not future.cancelled():
                future.exception()  # retrieved: its outcome was given up on
            self._log.warning(
                "%s: the thread running %s returned %.1fs after its timeout; its slot is free",
                name,
                command.body.command_id,
                time.monotonic() - started,
            )

        thread.add_done_callback(returned)
        return thread

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


class _PastTimeout(Exception):
    """A plain handler's thread is still running at its step's timeout."""

    def __init__(self, thread: asyncio.Future[Any]) -> None:
        super().__init__("past the step's timeout")
        self.thread = thread


def _error_type(exc: BaseException) -> str:
    return type(exc).__name__[:ERROR_TYPE_MAX]
