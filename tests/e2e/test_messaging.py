"""Start and cancel requests on the start topic, dead letters, and the Worker SDK's contract."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from orchestrator_kafka import NonRetryableError, Orchestrator, StepContext, WorkflowBuilder
from orchestrator_kafka.codec import decode, encode
from orchestrator_kafka.models import CancelSaga, StartBody, StartSaga, StepResult, command_id
from orchestrator_kafka.ports import IEventBus, InboundMessage, OutboxMessage

from ..conftest import Backend, unique
from .harness import Harness, ok, settle


class Tap:
    """Collects what arrives on some topics, through a consumer group of its own."""

    def __init__(self) -> None:
        self.messages: list[InboundMessage] = []

    async def attach(self, bus: IEventBus, topics: Sequence[str]) -> Tap:
        async def collect(batch: Sequence[InboundMessage]) -> None:
            self.messages.extend(batch)

        await bus.subscribe(list(topics), unique("tap"), collect)
        return self

    async def wait_for(self, count: int, timeout: float = 20.0) -> list[InboundMessage]:
        async def poll() -> None:
            while len(self.messages) < count:
                await asyncio.sleep(0.02)

        await asyncio.wait_for(poll(), timeout)
        return self.messages


def start_request(tx: str, workflow_id: str, context: dict[str, Any]) -> StartSaga:
    return StartSaga(
        event_id=str(uuid.uuid4()),
        transaction_id=tx,
        workflow_id=workflow_id,
        occurred_at=datetime.now(UTC),
        body=StartBody(context=context),
    )


def headers(message: InboundMessage) -> dict[str, bytes]:
    return dict(message.headers)


async def test_a_service_starts_and_cancels_sagas_through_the_start_topic(backend: Backend) -> None:
    gate = asyncio.Event()

    async def waits(ctx: StepContext) -> dict[str, Any]:
        await asyncio.wait_for(gate.wait(), 20)
        return {}

    workflow = WorkflowBuilder("topic_started").add_step("a", "worker_a", compensation="undo_a").build()
    async with Harness(backend, [workflow], {"worker_a": waits, "undo_a": ok()}) as h:
        bus, topic = h.orchestrator.event_bus, h.orchestrator.topics.start
        done, cancelled = unique("tx"), unique("tx")
        await bus.publish(
            [OutboxMessage(topic, done, encode(start_request(done, "topic_started", {"n": 1})))]
        )
        await bus.publish(
            [OutboxMessage(topic, cancelled, encode(start_request(cancelled, "topic_started", {})))]
        )
        await h.wait_state(cancelled, {"running"})
        cancel = CancelSaga(
            event_id=str(uuid.uuid4()),
            transaction_id=cancelled,
            workflow_id="topic_started",
            occurred_at=datetime.now(UTC),
        )
        await bus.publish([OutboxMessage(topic, cancelled, encode(cancel))])
        assert (await h.wait_final(cancelled))["state"] == "cancelled"
        gate.set()
        status = await h.wait_final(done)
    assert status["state"] == "completed"
    saga = await backend.store.load_context(done)
    assert saga is not None and saga.get("n") == 1


async def test_bad_messages_go_to_the_dead_letter_topic_with_their_reason(backend: Backend) -> None:
    workflow = WorkflowBuilder("dlq").add_step("a", "worker_a").build()
    async with Harness(backend, [workflow], {"worker_a": ok({"done": True})}) as h:
        bus, topics = h.orchestrator.event_bus, h.orchestrator.topics
        tap = await Tap().attach(bus, [topics.dlq])
        stray = StepResult.model_validate(
            {
                "event_id": str(uuid.uuid4()),
                "transaction_id": "no-such-saga",
                "workflow_id": "dlq",
                "occurred_at": datetime.now(UTC).isoformat(),
                "body": {
                    "command_id": "c",
                    "step": "a",
                    "kind": "execute",
                    "attempt": 1,
                    "status": "succeeded",
                },
            }
        )
        good = await h.orchestrator.execute_workflow("dlq", {})
        newer = orjson.loads(encode(start_request("x1", "dlq", {})))
        newer["schema_version"] = "2.0"
        missing = orjson.loads(encode(start_request("x2", "dlq", {})))
        del missing["transaction_id"]
        poison = [
            (topics.results, b"{not json", "malformed_json"),
            (topics.results, b"\xff\xfe\x00garbage", "invalid_utf8"),
            (topics.results, orjson.dumps({"event_type": "step.exploded"}), "unknown_event_type"),
            (topics.start, orjson.dumps(newer), "unsupported_schema_version"),
            (topics.start, orjson.dumps(missing), "invalid_message"),
            (topics.results, encode(stray), "unknown_transaction"),
            (topics.start, encode(start_request("x3", "no_such_workflow", {})), "unknown_workflow"),
            (topics.start, encode(stray.model_copy(update={"event_id": "other"})), "unexpected_event_type"),
            (topics.results, b"[1, 2]", "not_an_object"),
        ]
        await bus.publish(
            [OutboxMessage(topic, "poison", value, (("origin", b"test"),)) for topic, value, _ in poison]
        )
        dead = await tap.wait_for(len(poison))
        after = await h.orchestrator.execute_workflow("dlq", {})
        assert (await h.wait_final(good))["state"] == "completed"
        assert (await h.wait_final(after))["state"] == "completed"
        await settle()
    assert len(tap.messages) == len(poison)  # each once
    by_value = {m.value: m for m in dead}
    for topic, value, reason in poison:
        message = by_value[value]
        h_ = headers(message)
        assert h_["dlq.reason"] == reason.encode(), (value, h_)
        assert h_["dlq.source.topic"] == topic.encode()
        assert int(h_["dlq.source.offset"]) >= 0 and int(h_["dlq.source.partition"]) >= 0
        assert h_["origin"] == b"test"  # the original headers are kept
        assert message.key == b"poison"


async def test_worker_turns_exceptions_and_bad_results_into_failures(backend: Backend) -> None:
    async def raises(ctx: StepContext) -> dict[str, Any]:
        raise KeyError("sku-9")

    async def not_a_dict(ctx: StepContext) -> Any:
        return ["a", "list"]

    async def not_json(ctx: StepContext) -> dict[str, Any]:
        return {"when": object()}

    def sync_fails(ctx: StepContext) -> dict[str, Any]:
        raise NonRetryableError("plain function refused")

    cases = {"raises": raises, "not_a_dict": not_a_dict, "not_json": not_json, "sync_fails": sync_fails}
    workflows = [
        WorkflowBuilder(f"wf_{name}")
        .add_step("s", name)
        .with_retry_config(max_retries=1, initial_delay=0.01, max_delay=0.01)
        .build()
        for name in cases
    ]
    async with Harness(backend, workflows, cases) as h:
        txs = {name: await h.orchestrator.execute_workflow(f"wf_{name}", {}) for name in cases}
        statuses = {name: await h.wait_final(tx) for name, tx in txs.items()}
    assert all(s["state"] == "compensated" for s in statuses.values())
    assert "KeyError: 'sku-9'" in statuses["raises"]["error"]
    assert len(h.executed(txs["raises"])) == 2  # retryable
    assert "handler returned list, expected a dict or None" in statuses["not_a_dict"]["error"]
    assert len(h.executed(txs["not_a_dict"])) == 1  # a programming error is not retried
    assert "not JSON-serialisable" in statuses["not_json"]["error"]
    assert "NonRetryableError: plain function refused" in statuses["sync_fails"]["error"]
    assert len(h.executed(txs["sync_fails"])) == 1


async def test_a_plain_function_handler_and_none_result_work(backend: Backend) -> None:
    def sync_handler(ctx: StepContext) -> dict[str, Any]:
        return {"sum": ctx.get("a", 0) + 1}

    async def returns_none(ctx: StepContext) -> None:
        return None

    workflow = WorkflowBuilder("sync").add_step("one", "sync_worker").add_step("two", "none_worker").build()
    async with Harness(backend, [workflow], {"sync_worker": sync_handler, "none_worker": returns_none}) as h:
        tx = await h.orchestrator.execute_workflow("sync", {"a": 41})
        status = await h.wait_final(tx)
    assert status["state"] == "completed"
    assert status["step_results"] == {"one": {"sum": 42}, "two": {}}


async def test_the_worker_runs_a_redelivered_command_once_and_answers_again(backend: Backend) -> None:
    runs: list[str] = []

    async def counted(ctx: StepContext) -> dict[str, Any]:
        runs.append(ctx.command_id)
        return {"n": len(runs)}

    workflow = WorkflowBuilder("dedupe").add_step("a", "worker_a").build()
    async with Harness(backend, [workflow], {"worker_a": counted}) as h:
        bus, topics = h.orchestrator.event_bus, h.orchestrator.topics
        tap = await Tap().attach(bus, [topics.commands("worker_a"), topics.results])
        tx = await h.orchestrator.execute_workflow("dedupe", {})
        run = (await h.wait_final(tx))["run_id"]
        await tap.wait_for(2)
        command = next(m for m in tap.messages if m.topic == topics.commands("worker_a"))
        await bus.publish([OutboxMessage(command.topic, tx, command.value or b"")])  # redelivered

        async def two_results() -> None:
            while sum(m.topic == topics.results for m in tap.messages) < 2:
                await asyncio.sleep(0.02)

        await asyncio.wait_for(two_results(), 20)
    assert runs == [command_id(tx, "a", "execute", 1, run)]
    results = [decode(m.value) for m in tap.messages if m.topic == topics.results]
    assert results[0] == results[1]  # the same answer, the same event id: the orchestrator dedupes it


async def test_the_orchestrator_creates_both_topics_of_every_worker_name(backend: Backend) -> None:
    """A worker (in any language) subscribes to both of its topics: they exist for a name used only for
    compensations, and for one whose steps have no compensation, before anything is sent to them."""
    workflow = WorkflowBuilder("both_topics").add_step("a", "both_a", compensation="both_undo").build()
    orchestrator = Orchestrator([workflow], backend.bus(), backend.store)
    await orchestrator.start()
    try:
        bus, topics = orchestrator.event_bus, orchestrator.topics
        for name in ("both_a", "both_undo"):
            for topic in topics.of_worker(name):
                assert [m async for m in bus.read(topic)] == []  # a missing topic raises EventBusError
    finally:
        await orchestrator.stop()
