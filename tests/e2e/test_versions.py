"""Versions: a saga runs on the version it started with; one whose version is not loaded is parked, its
events dead-lettered (``unknown_version``), and it carries on where that version runs again."""

from __future__ import annotations

import orjson

from orchestrator_kafka import SagaClient, WorkflowBuilder
from orchestrator_kafka.models import command_id
from orchestrator_kafka.workflow import WorkflowDefinition

from ..conftest import Backend
from .harness import Harness, ok
from .test_messaging import Tap, headers


def v1() -> WorkflowDefinition:
    return WorkflowBuilder("rollout").add_step("a", "worker_a").add_step("b", "worker_b").build()


def v2() -> WorkflowDefinition:
    # Step b renamed: a new shape, so a new fingerprint.
    return WorkflowBuilder("rollout").add_step("a", "worker_a").add_step("b2", "worker_b").build()


def actions_of(tap: Tap, tx: str) -> list[str]:
    found = []
    for message in tap.messages:
        event = orjson.loads(message.value or b"{}")
        if event.get("transaction_id") == tx:
            found.extend(a["action"] for a in event["body"]["actions"])
    return found


async def test_a_saga_of_a_version_not_loaded_is_parked_then_resumes_where_it_is(backend: Backend) -> None:
    old, new = v1(), v2()
    assert old.version != new.version
    # Step b's worker is not running yet: the saga waits on b, on version 1.
    async with Harness(backend, [old], {"worker_a": ok({"a": 1})}) as h:
        tx = await h.orchestrator.execute_workflow("rollout", {})
        waiting = await h.wait_state(tx, {"running"})
        while waiting["steps"].get("b") != "running":
            waiting = await h.wait_state(tx, {"running"})
    assert waiting["workflow_version"] == old.version and waiting["parked"] is None
    cid = command_id(tx, "b", "execute", 1, waiting["run_id"])

    # Deployed: only version 2. New sagas run on it. Step b's worker, up now, answers the saga's
    # command; that result cannot be applied here.
    handlers = {"worker_a": ok({"a": 1}), "worker_b": ok({"b": 2})}
    async with Harness(backend, [new], handlers) as h:
        bus, topics = h.orchestrator.event_bus, h.orchestrator.topics
        dlq = await Tap().attach(bus, [topics.dlq])
        audit = await Tap().attach(bus, [topics.events])
        fresh = await h.orchestrator.execute_workflow("rollout", {})
        assert (await h.wait_final(fresh))["workflow_version"] == new.version
        [dead] = await dlq.wait_for(1)
        parked = await h.orchestrator.get_status(tx)
        await audit.wait_for(1)
        while "saga_parked" not in actions_of(audit, tx):
            await audit.wait_for(len(audit.messages) + 1)
    late = dead.value or b""
    assert headers(dead)["dlq.reason"] == b"unknown_version"
    assert orjson.loads(late)["body"]["command_id"] == cid
    assert headers(dead)["dlq.source.topic"] == topics.results.encode()
    assert parked["state"] == "running" and parked["steps"]["b"] == "running"
    assert "'rollout'" in parked["parked"] and old.version in parked["parked"]
    client = SagaClient(None, backend.store)
    rows = {r["workflow_version"]: r for r in await client.versions_in_flight("rollout")}
    assert rows[old.version]["in_flight"] >= 1 and rows[old.version]["parked"] >= 1

    # Both versions carried: the dead letter, redriven, is applied, and the saga ends on version 1.
    async with Harness(backend, [old, new], handlers) as h:
        bus, topics = h.orchestrator.event_bus, h.orchestrator.topics
        audit = await Tap().attach(bus, [topics.events])
        redrive = await SagaClient(bus).redrive(reason="unknown_version", transaction_id=tx)
        assert len(redrive.redriven) == 1 and not redrive.refused
        done = await h.wait_final(tx)
        newest = await h.orchestrator.execute_workflow("rollout", {})
        assert (await h.wait_final(newest))["workflow_version"] == new.version
        while "saga_completed" not in actions_of(audit, tx):
            await audit.wait_for(len(audit.messages) + 1)
    assert done["state"] == "completed" and done["parked"] is None
    assert done["workflow_version"] == old.version and set(done["step_results"]) == {"a", "b"}
    seen = actions_of(audit, tx)  # the whole audit of the saga, from the earliest
    at = seen.index("saga_resumed")
    assert seen.index("saga_parked") < at and seen[at + 1] == "step_succeeded"
    assert seen.count("saga_parked") == seen.count("saga_resumed") == 1
    rows = {r["workflow_version"]: r for r in await client.versions_in_flight("rollout")}
    assert old.version not in rows or rows[old.version]["parked"] == 0


async def test_new_sagas_take_the_default_version_and_keep_theirs(backend: Backend) -> None:
    old, new = v1(), v2()
    handlers = {"worker_a": ok({}), "worker_b": ok({})}
    options = {"default_versions": {"rollout": old.version}}
    async with Harness(backend, [old, new], handlers, orchestrator_options=options) as h:
        tx = await h.orchestrator.execute_workflow("rollout", {})
        status = await h.wait_final(tx)
    assert status["state"] == "completed" and status["workflow_version"] == old.version
    assert set(status["step_results"]) == {"a", "b"}
