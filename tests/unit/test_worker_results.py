"""The Worker's replies, built as bytes on its hot path, are exactly the StepResult the model would build;
and the hot path keeps the documented behaviour (failures, timeouts, dedupe, concurrency). The commands go
through the in-memory bus, as in production they go through Kafka."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from orchestrator_kafka import codec
from orchestrator_kafka.backends.memory import InMemoryEventBus
from orchestrator_kafka.constants import HEADER_DLQ_REASON
from orchestrator_kafka.errors import NonRetryableError
from orchestrator_kafka.models import CommandBody, ErrorInfo, ResultBody, StepCommand, StepResult
from orchestrator_kafka.ports import OutboxMessage
from orchestrator_kafka.worker import Handler, StepContext, Worker

NAME = "inv"


class RecordingBus(InMemoryEventBus):
    def __init__(self) -> None:
        super().__init__()
        self.published: list[OutboxMessage] = []

    async def publish(self, messages: Sequence[OutboxMessage]) -> None:
        self.published.extend(messages)
        await super().publish(messages)


def command(
    i: int = 0,
    *,
    timeout: float | None = None,
    worker_name: str = NAME,
    kind: str = "execute",
    schema_version: str = "1.0",
) -> StepCommand:
    return StepCommand(
        schema_version=schema_version,
        event_id=str(uuid.uuid4()),
        transaction_id=f"tx-{i}",
        workflow_id="wf",
        occurred_at=datetime.now(UTC),
        body=CommandBody(
            command_id=f"cmd-{i}",
            step="reserve",
            worker_name=worker_name,
            kind=kind,
            attempt=2,
            data={"i": i, "sku": "é"},
            timeout=timeout,
        ),
    )


def wire(cmd: StepCommand) -> OutboxMessage:
    """``cmd`` as the orchestrator publishes it, on its worker's topic."""
    return OutboxMessage(f"saga.commands.{cmd.body.worker_name}", cmd.transaction_id, codec.encode(cmd))


async def replies(bus: RecordingBus, count: int, timeout: float = 10) -> list[OutboxMessage]:
    """The first ``count`` messages the worker published, once it has published that many."""

    async def published() -> list[OutboxMessage]:
        while True:
            out = [m for m in bus.published if m.topic in ("saga.results", "saga.dlq")]
            if len(out) >= count:
                return out
            await asyncio.sleep(0.005)

    return await asyncio.wait_for(published(), timeout)


def in_order_of(out: Sequence[OutboxMessage], commands: Sequence[StepCommand]) -> list[OutboxMessage]:
    """The replies in the order of the commands they answer (they are published as they finish)."""
    by_id = {codec.decode(m.value).body.command_id: m for m in out}  # type: ignore[union-attr]
    return [by_id[c.body.command_id] for c in commands]


async def run_batch(
    fn: Handler, commands: Sequence[StepCommand], *, concurrency: int = 64
) -> tuple[Worker, RecordingBus, list[OutboxMessage]]:
    """Publish ``commands`` to a running worker; its replies, in the commands' order."""
    bus = RecordingBus()
    await bus.start()
    worker = Worker(bus, concurrency=concurrency)
    worker.register(NAME, fn)
    await worker.start()
    try:
        await bus.publish([wire(c) for c in commands])
        out = await replies(bus, len(commands))
    finally:
        await worker.stop()
    return worker, bus, in_order_of(out, commands)


def expected_reply(
    cmd: StepCommand, got: StepResult, result: dict[str, Any] | None, error: ErrorInfo | None
) -> StepResult:
    """The StepResult the pydantic model builds for ``cmd``, with the reply's own id and time."""
    return StepResult(
        event_id=got.event_id,
        transaction_id=cmd.transaction_id,
        workflow_id=cmd.workflow_id,
        occurred_at=got.occurred_at,
        body=ResultBody(
            command_id=cmd.body.command_id,
            step=cmd.body.step,
            kind=cmd.body.kind,
            attempt=cmd.body.attempt,
            status="failed" if error else "succeeded",
            result=None if error else result,
            error=error,
        ),
    )


def check_reply(
    message: OutboxMessage, cmd: StepCommand, result: dict[str, Any] | None, error: ErrorInfo | None
) -> StepResult:
    assert message.topic == "saga.results" and message.key == cmd.transaction_id
    got = codec.decode(message.value)
    assert isinstance(got, StepResult)
    model = expected_reply(cmd, got, result, error)
    assert got == model
    assert message.value == codec.encode(model)  # byte for byte, key order included
    assert uuid.UUID(got.event_id).version == 4 and str(uuid.UUID(got.event_id)) == got.event_id
    assert orjson.loads(message.value)["occurred_at"].endswith("Z")
    assert abs(datetime.now(UTC) - got.occurred_at) < timedelta(seconds=30)
    return got


async def test_success_reply_is_the_models() -> None:
    cmd = command(timeout=5)
    seen: list[StepContext] = []

    async def fn(ctx: StepContext) -> dict[str, Any]:
        seen.append(ctx)
        return {"ok": True, "n": [1, 2.5, None, "é"], "nested": {"a": {}}}

    _, _, out = await run_batch(fn, [cmd])
    assert len(out) == 1
    check_reply(out[0], cmd, {"ok": True, "n": [1, 2.5, None, "é"], "nested": {"a": {}}}, None)
    assert seen == [
        StepContext(
            transaction_id="tx-0",
            workflow_id="wf",
            step="reserve",
            worker_name=NAME,
            attempt=2,
            data={"i": 0, "sku": "é"},
            is_compensation=False,
            command_id="cmd-0",
        )
    ]


async def test_none_result_is_an_empty_dict() -> None:
    cmd = command(kind="compensate")

    async def fn(ctx: StepContext) -> None:
        assert ctx.is_compensation
        return None

    _, _, out = await run_batch(fn, [cmd])
    check_reply(out[0], cmd, {}, None)


async def test_exception_is_a_retryable_failure_with_type_and_message() -> None:
    cmd = command()

    async def fn(ctx: StepContext) -> dict[str, Any]:
        raise KeyError("missing")

    _, _, out = await run_batch(fn, [cmd])
    check_reply(out[0], cmd, None, ErrorInfo(type="KeyError", message="'missing'", retryable=True))


async def test_non_retryable_error_fails_at_once() -> None:
    cmd = command()

    class OutOfStock(NonRetryableError):
        pass

    async def fn(ctx: StepContext) -> dict[str, Any]:
        raise OutOfStock("x" * 20_000)

    _, _, out = await run_batch(fn, [cmd])
    check_reply(out[0], cmd, None, ErrorInfo(type="OutOfStock", message="x" * 10_000, retryable=False))


@pytest.mark.parametrize(
    ("outcome", "message"),
    [
        ([1, 2], "handler returned list, expected a dict or None"),
        ("ok", "handler returned str, expected a dict or None"),
        ({"s": {1, 2}}, "handler result is not JSON-serialisable: Type is not JSON serializable: set"),
        ({1: "a"}, "handler result is not JSON-serialisable: Dict key must be str"),
    ],
)
async def test_bad_results_are_non_retryable_failures(outcome: object, message: str) -> None:
    cmd = command()

    async def fn(ctx: StepContext) -> Any:
        return outcome

    _, _, out = await run_batch(fn, [cmd])
    check_reply(out[0], cmd, None, ErrorInfo(type="TypeError", message=message, retryable=False))


async def test_result_values_encode_as_before() -> None:
    """A result is what ``orjson.dumps`` makes of it, as it was: a datetime keeps its ``+00:00``, a
    tuple is a list, and a result orjson encodes only just (254 levels deep) still goes through, though
    the envelope adds two levels."""
    cmd = command()
    deep: dict[str, Any] = {}
    cur = deep
    for _ in range(252):
        cur["a"] = {}
        cur = cur["a"]
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

    async def fn(ctx: StepContext) -> dict[str, Any]:
        return {"when": when, "pair": (1, 2), "deep": deep}

    _, _, out = await run_batch(fn, [cmd])
    expected = orjson.loads(orjson.dumps({"when": when, "pair": (1, 2), "deep": deep}))
    with pytest.raises(TypeError, match="Recursion limit"):
        orjson.dumps({"body": {"result": {"deep": deep}}})
    assert expected["when"] == "2026-01-02T03:04:05+00:00"
    check_reply(out[0], cmd, expected, None)


async def test_undecodable_exception_text_is_still_a_failure() -> None:
    cmd = command()

    async def fn(ctx: StepContext) -> dict[str, Any]:
        raise ValueError("bad \udc80 text")

    _, _, out = await run_batch(fn, [cmd])
    check_reply(out[0], cmd, None, ErrorInfo(type="ValueError", message="bad ? text", retryable=True))


async def test_plain_function_runs_in_a_thread() -> None:
    cmd = command()
    threads: list[int] = []

    def fn(ctx: StepContext) -> dict[str, Any]:
        threads.append(threading.get_ident())
        return {"sync": ctx.attempt}

    _, _, out = await run_batch(fn, [cmd])
    check_reply(out[0], cmd, {"sync": 2}, None)
    assert threads and threads[0] != threading.get_ident()


@pytest.mark.parametrize("n", [1, 3])
async def test_timeout_fails_the_attempt_and_not_the_batch(n: int) -> None:
    commands = [command(i, timeout=0.05) for i in range(n)]

    async def fn(ctx: StepContext) -> dict[str, Any]:
        await asyncio.sleep(10)
        return {}

    started = time.monotonic()
    _, _, out = await run_batch(fn, commands)
    assert time.monotonic() - started < 5
    assert len(out) == n
    error = ErrorInfo(type="TimeoutError", message="handler timed out after 0.05s", retryable=True)
    for message, cmd in zip(out, commands, strict=True):
        check_reply(message, cmd, None, error)
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_handler_raising_timeout_error_itself_keeps_its_message() -> None:
    cmd = command()

    async def fn(ctx: StepContext) -> dict[str, Any]:
        raise TimeoutError("upstream slow")

    _, _, out = await run_batch(fn, [cmd])
    check_reply(out[0], cmd, None, ErrorInfo(type="TimeoutError", message="upstream slow", retryable=True))


async def test_redelivered_command_is_answered_with_the_same_bytes() -> None:
    calls: list[str] = []

    async def fn(ctx: StepContext) -> dict[str, Any]:
        calls.append(ctx.command_id)
        return {"n": len(calls)}

    bus = RecordingBus()
    await bus.start()
    worker = Worker(bus)
    worker.register(NAME, fn)
    cmds = [command(i) for i in range(3)]
    await worker.start()
    # A copy right behind the first runs nothing: answered from the window, or by the first if it is
    # still running then.
    await bus.publish([wire(c) for c in [*cmds, cmds[0]]])
    first = in_order_of(await replies(bus, 3), cmds)
    await worker.stop()  # lets the copy finish
    assert sorted(calls) == ["cmd-0", "cmd-1", "cmd-2"]
    bus.published.clear()
    await worker.start()  # the same worker, its window kept, the group resuming after what it committed
    await bus.publish([wire(c) for c in reversed(cmds)])
    again = in_order_of(await replies(bus, 3), cmds)
    await worker.stop()
    assert sorted(calls) == ["cmd-0", "cmd-1", "cmd-2"]
    assert [m.value for m in again] == [m.value for m in first]
    assert len([m for m in bus.published if m.topic == "saga.results"]) == 3


@pytest.mark.parametrize(("concurrency", "n"), [(1, 4), (3, 10), (64, 20)])
async def test_handlers_run_concurrently_up_to_the_limit(concurrency: int, n: int) -> None:
    running = 0
    peak = 0
    all_in = asyncio.Event()

    async def fn(ctx: StepContext) -> dict[str, Any]:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        if peak == min(concurrency, n):
            all_in.set()
        await asyncio.wait_for(all_in.wait(), 5)  # fails unless as many run at once as may
        await asyncio.sleep(0.001)
        running -= 1
        return {"i": ctx.data["i"]}

    cmds = [command(i) for i in range(n)]
    _, _, out = await run_batch(fn, cmds, concurrency=concurrency)
    assert peak == min(concurrency, n)
    for message, cmd in zip(out, cmds, strict=True):
        check_reply(message, cmd, {"i": cmd.body.data["i"]}, None)


async def test_plain_handlers_run_concurrently_on_the_workers_own_threads() -> None:
    """More plain handlers at once than the event loop's default pool has threads (min(32, cpus + 4)):
    each has a thread of the worker's, sized to its slots."""
    n = 40
    barrier = threading.Barrier(n, timeout=20)
    names: set[str] = set()

    def fn(ctx: StepContext) -> dict[str, Any]:
        names.add(threading.current_thread().name)
        barrier.wait()  # broken (a failed step) unless all n run at once
        return {}

    cmds = [command(i) for i in range(n)]
    _, _, out = await run_batch(fn, cmds, concurrency=n)
    assert [codec.decode(m.value).body.status for m in out] == ["succeeded"] * n  # type: ignore[union-attr]
    assert len(names) == n and all(name.startswith("saga-worker") for name in names)


async def test_bad_messages_are_dead_lettered_and_the_commands_beside_them_answered() -> None:
    async def fn(ctx: StepContext) -> dict[str, Any]:
        if ctx.data["i"] % 2:
            await asyncio.sleep(0)
        return {"i": ctx.data["i"]}

    bus = RecordingBus()
    await bus.start()
    worker = Worker(bus, concurrency=2)
    worker.register(NAME, fn)
    await worker.start()
    good = [command(i) for i in range(5)]
    minor = command(10, schema_version="1.7")
    topic = "saga.commands.inv"
    await bus.publish(
        [
            wire(good[0]),
            OutboxMessage(topic, "k", b"{not json"),
            OutboxMessage(topic, "k", codec.encode(command(7, worker_name="other"))),
            wire(command(9, schema_version="2.0")),
            OutboxMessage(topic, "k", None),  # type: ignore[arg-type]  # a tombstone, as Kafka may carry
            *[wire(c) for c in good[1:]],
            wire(minor),
        ]
    )
    out = await replies(bus, 10)
    await worker.stop()
    dead = [dict(m.headers)[HEADER_DLQ_REASON].decode() for m in out if m.topic == "saga.dlq"]
    assert sorted(dead) == sorted(
        [
            codec.MALFORMED_JSON,
            codec.UNEXPECTED_EVENT_TYPE,
            codec.UNSUPPORTED_SCHEMA_VERSION,
            codec.NULL_VALUE,
        ]
    )
    answered = [*good, minor]
    results = in_order_of([m for m in out if m.topic == "saga.results"], answered)
    for message, cmd in zip(results, answered, strict=True):
        check_reply(message, cmd, {"i": cmd.body.data["i"]}, None)
