"""Dead letters sent back to where they came from (redrive), on both backends: what an operator does once
the reason a message was refused is gone."""

from __future__ import annotations

import asyncio

from orchestrator_kafka import SagaClient, WorkflowBuilder
from orchestrator_kafka.codec import encode
from orchestrator_kafka.ports import OutboxMessage

from ..conftest import Backend
from .harness import Harness, ok, settle
from .test_messaging import start_request


async def test_a_start_for_a_workflow_deployed_later_is_redriven_once_and_runs(backend: Backend) -> None:
    known = WorkflowBuilder("known").add_step("a", "worker_a").build()
    later = WorkflowBuilder("later").add_step("b", "worker_b").build()
    handlers = {"worker_a": ok(), "worker_b": ok({"b": True})}
    async with Harness(backend, [known], handlers) as h:
        bus, topics = h.orchestrator.event_bus, h.orchestrator.topics
        client = SagaClient(bus)
        await bus.publish(
            [
                OutboxMessage(
                    topics.start, f"late-{i}", encode(start_request(f"late-{i}", "later", {"i": i}))
                )
                for i in range(3)
            ]
        )
        async with asyncio.timeout(30):
            while len(letters := await client.dead_letters(reason="unknown_workflow")) < 3:
                await asyncio.sleep(0.05)
        assert {letter.key for letter in letters} == {"late-0", "late-1", "late-2"}
        assert all(letter.source_topic == topics.start and letter.redriven_by is None for letter in letters)
        dry = await client.redrive(reason="unknown_workflow", dry_run=True)
        assert len(dry.redriven) == 3 and not dry.refused
        assert all(letter.redriven_by is None for letter in await client.dead_letters())  # nothing sent

    # The workflow is deployed: the letters of two of the sagas go back and run, each once.
    async with Harness(backend, [known, later], handlers) as h:
        client = SagaClient(h.orchestrator.event_bus)
        first = await client.redrive(reason="unknown_workflow", transaction_id="late-0", request_id="r1")
        by_position = [letter.position for letter in letters if letter.key == "late-1"]
        second = await client.redrive(positions=by_position, request_id="r2")
        assert [letter.key for letter in first.redriven] == ["late-0"]
        assert [letter.key for letter in second.redriven] == ["late-1"]
        for tx in ("late-0", "late-1"):
            status = await h.wait_final(tx)
            assert status["state"] == "completed" and status["step_results"]["b"] == {"b": True}
        again = await client.redrive(reason="unknown_workflow", request_id="r3")
        assert [letter.key for letter in again.redriven] == ["late-2"]
        assert sorted((letter.key, why) for letter, why in again.refused) == [
            ("late-0", "sent back already, by redrive r1"),
            ("late-1", "sent back already, by redrive r2"),
        ]
        assert (await h.wait_final("late-2"))["state"] == "completed"
        await settle()
        assert sorted(c.transaction_id for c in h.calls) == ["late-0", "late-1", "late-2"]  # each once
        listed = {letter.key: letter.redriven_by for letter in await client.dead_letters()}
        assert listed == {"late-0": "r1", "late-1": "r2", "late-2": "r3"}  # markers are not letters


async def test_a_redriven_message_refused_again_is_a_new_letter_that_says_where_it_came_from(
    backend: Backend,
) -> None:
    known = WorkflowBuilder("known").add_step("a", "worker_a").build()
    async with Harness(backend, [known], {"worker_a": ok()}) as h:
        bus, topics = h.orchestrator.event_bus, h.orchestrator.topics
        client = SagaClient(bus)
        await bus.publish([OutboxMessage(topics.start, "lost", encode(start_request("lost", "nowhere", {})))])
        async with asyncio.timeout(30):
            while not (letters := await client.dead_letters()):
                await asyncio.sleep(0.05)
        report = await client.redrive(transaction_id="lost", request_id="r1")
        assert len(report.redriven) == 1
        async with asyncio.timeout(30):
            while len(letters := await client.dead_letters()) < 2:
                await asyncio.sleep(0.05)
        old, new = sorted(letters, key=lambda letter: letter.redriven_by is None)
        assert old.redriven_by == "r1" and new.redriven_by is None
        assert new.came_from == old.position and new.reason == "unknown_workflow"
        assert new.value == old.value and not any(k.startswith("dlq.redrive") for k, _ in new.headers)
