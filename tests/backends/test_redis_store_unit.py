"""RedisStateStore without a Redis server: its key layout, what it packs for its script, its settings,
and its errors when Redis cannot be reached. The tests on a server are in test_redis_store.py, and what
every state store does in tests/contract/test_state_store.py."""

from __future__ import annotations

import dataclasses
import re
import socket
import time
from importlib import resources
from typing import Any

import orjson
import pytest
from aiokafka.partitioner import DefaultPartitioner, murmur2

from orchestrator_kafka.backends.redis import RedisKeys, RedisStateStore, packing
from orchestrator_kafka.backends.redis.keys import PYTHON_ONLY
from orchestrator_kafka.backends.redis.packing import (
    Outcome,
    RecordField,
    TimerField,
    WriteField,
    compact_json,
    dump_outbox,
    dump_timer,
    event_digest,
    load_outbox,
    load_record,
    pack,
    saga_json,
)
from orchestrator_kafka.backends.redis.partitions import partition_of
from orchestrator_kafka.backends.redis.script import SCRIPT
from orchestrator_kafka.context import LateCompensation, SagaContext, StepStatus, WorkflowState
from orchestrator_kafka.errors import NotReplicatedError, StateStoreError, ValidationError
from orchestrator_kafka.ports import OutboxMessage, Timer, TransitionWrite

from ..contract.test_state_store import every_method, msg, saga

# ---------------------------------------------------------------- the key layout and the packed batch


def test_redis_keys_name_the_documented_layout() -> None:
    keys = RedisKeys("P")
    assert [keys.saga(3, "tx"), keys.events(3, "tx"), keys.outbox(3, "tx"), keys.saga_timers(3, "tx")] == [
        "P:{p3}:s:tx",
        "P:{p3}:ev:tx",
        "P:{p3}:o:tx",
        "P:{p3}:t:tx",
    ]
    assert [keys.outboxes(0), keys.timers(0), keys.timer_entries(0), keys.workflows(0)] == [
        "P:{p0}:outboxes",
        "P:{p0}:timers",
        "P:{p0}:timer",
        "P:{p0}:workflows",
    ]
    assert keys.index(11, WorkflowState.COMPLETED, "a:b") == "P:{p11}:idx:completed:a:b"
    assert keys.partitions == "P:partitions" and keys.tagged(2) == "P:{p2}"
    assert RedisKeys().prefix == "saga"


def test_a_saga_s_partition_is_the_one_kafka_gives_its_messages() -> None:
    """The partition aiokafka's default partitioner picks for a message keyed by the id, for any count;
    and the hash is the Java client's."""
    for count in (1, 2, 4, 7, 64):
        for tx in ("a", "tx-1", "ü-🙂", "bench-1a2b3c4d-12345", str(count) * 40):
            expected = DefaultPartitioner()(tx.encode(), list(range(count)), list(range(count)))
            assert partition_of(tx, count) == expected
    # The Java client's own test vector: Utils.murmur2("21".getBytes()) == -973932308.
    assert murmur2(b"21") == -973932308 & 0xFFFFFFFF


def test_bad_prefix_is_rejected() -> None:
    for bad in ("", "a{b", "a}b"):
        with pytest.raises(ValidationError):
            RedisKeys(bad)
        with pytest.raises(ValidationError):
            RedisStateStore("redis://localhost:6379/0", key_prefix=bad)


def test_packed_rows_follow_the_field_positions() -> None:
    """The packer writes each row as a plain tuple for speed: check it against WriteField and TimerField,
    the positions the script reads the rows by."""
    t = Timer("tm-1", "t1", 12.5, "timeout", "pay", "execute", 3, "cmd")
    full = TransitionWrite(
        "e1", "t1", 0, saga("t1", 1, WorkflowState.COMPENSATING), (msg(1),), (t,), cancel_timers=("old",)
    )
    bare = TransitionWrite("e2", "t2", 4, None, cancel_timers=("x", "y"))
    raw_rows, data = pack([full, bare])
    rows: list[list[Any]] = orjson.loads(raw_rows)
    ctx, entry, timer_entry = (
        compact_json(saga("t1", 1, WorkflowState.COMPENSATING)),
        dump_outbox(1, (msg(1),)),
        dump_timer(t),
    )

    expected_full = {
        WriteField.EVENT_DIGEST: event_digest("e1"),
        WriteField.TX: "t1",
        WriteField.EXPECTED_VERSION: 0,
        WriteField.NEW_VERSION: 1,
        WriteField.CONTEXT_LEN: len(ctx),
        WriteField.WORKFLOW: "orders",
        WriteField.STATE: "compensating",
        WriteField.OUTBOX_LEN: len(entry),
        WriteField.CANCEL_TIMERS: ["old"],
        WriteField.UPDATED_MS: int(saga("t1", 1).updated_at.timestamp() * 1000),
    }
    expected_bare = {
        WriteField.EVENT_DIGEST: event_digest("e2"),
        WriteField.TX: "t2",
        WriteField.EXPECTED_VERSION: 4,
        WriteField.NEW_VERSION: 0,
        WriteField.CONTEXT_LEN: 0,
        WriteField.WORKFLOW: "",
        WriteField.STATE: "",
        WriteField.OUTBOX_LEN: 0,
        WriteField.TIMERS: [],
        WriteField.CANCEL_TIMERS: ["x", "y"],
        WriteField.UPDATED_MS: 0,
    }
    assert set(expected_full) | {WriteField.TIMERS} == set(expected_bare) == set(WriteField)
    assert [len(row) for row in rows] == [len(WriteField)] * 2
    for f, value in expected_full.items():
        assert rows[0][f - 1] == value, f
    for f, value in expected_bare.items():
        assert rows[1][f - 1] == value, f
    [timer_row] = rows[0][WriteField.TIMERS - 1]  # by TimerField
    assert len(timer_row) == len(TimerField)
    assert timer_row[TimerField.ID - 1] == "tm-1"
    assert timer_row[TimerField.DUE_AT - 1] == 12.5
    assert timer_row[TimerField.ENTRY_LEN - 1] == len(timer_entry)
    assert data == ctx + entry + timer_entry


def test_the_script_reads_keys_and_fields_only_by_the_generated_names() -> None:
    lua = resources.files("orchestrator_kafka.backends.redis").joinpath("scripts.lua").read_text("utf-8")
    # The script Redis runs is the file after the generated definitions.
    assert SCRIPT.endswith(lua)
    generated = SCRIPT.removesuffix(lua)
    # The script uses every name generated from Python, and no other.
    used = set(re.findall(r"\b(K|W|T|R|RF)\.([A-Za-z_]+)", lua))
    key_kinds = {
        name for name in dir(RedisKeys) if not name.startswith("_") and name != "prefix"
    } - PYTHON_ONLY
    enums = (("W", WriteField), ("T", TimerField), ("R", Outcome), ("RF", RecordField))
    assert used == {("K", name) for name in key_kinds} | {(t, m.name) for t, enum in enums for m in enum}
    for name in key_kinds:
        assert f"function K.{name}(" in generated or f"  {name} = P .. " in generated, name
    # No packed row or reply is read or written by a bare number, and no key is spelled out.
    assert not re.search(r"\b[wt]\[\d|\{\d[,}]", lua)
    assert not re.search(r"'[:{}]", lua)


def test_an_outbox_entry_without_its_head_is_refused() -> None:
    assert load_outbox(dump_outbox(7, (msg(1), msg(2)))) == (msg(1), msg(2))
    with pytest.raises(ValueError, match="newline"):
        load_outbox(b'[7,["saga.events","k2","\\u00ff",[]]]')


# ---------------------------------------------------------------- the stored saga


def test_a_record_reads_back_whole_and_stores_little_but_the_saga_s_own_values() -> None:
    full = saga('t"1\\', 3, WorkflowState.COMPENSATING, wf="w:ü")  # ids that JSON must escape
    full.step("a").attempt = 2
    full.step("a").command_id = full.transaction_id + ":a:execute:2"
    full.step("b")
    full.completed.append("a")
    body = compact_json(full)
    record = b"".join(
        b"%d:%s" % (len(f), f) for f in (b"3", b"compensating", "w:ü".encode(), event_digest("e").encode())
    )
    assert SagaContext.from_json(saga_json(full.transaction_id, record + body)) == full
    expanded = body
    for byte, word in packing._WORDS:  # the keys every saga repeats, one byte each
        expanded = expanded.replace(byte, word)
    stored = orjson.loads(expanded.replace(b"\x01", b"\\u0001"))  # the id's byte is a control character
    # Apart in the record, or at their defaults: left out. The id, where it recurs, is one byte.
    left_out = {"transaction_id", "workflow_id", "state", "version", "current_step", "error", "late_runs"}
    assert left_out.isdisjoint(stored)
    assert stored["steps"] == {
        "a": {"attempt": 2, "command_id": "\x01:a:execute:2"},
        "b": {},
    }
    assert stored["completed"] == ["a"]
    assert len(body) < len(full.to_json()) / 2
    empty = SagaContext("t", "w", created_at=full.created_at, updated_at=full.updated_at)
    assert (
        SagaContext.from_json(saga_json("t", b"1:0" + b"7:pending" + b"1:w" + b"0:" + compact_json(empty)))
        == empty
    )


def test_the_generated_field_filters_keep_exactly_the_fields_off_their_defaults() -> None:
    """compact_json leaves defaults out through code generated from the dataclasses' fields: it must keep
    what a plain comparison of every field with its default keeps."""

    def reference(obj: object, apart: frozenset[str] = frozenset()) -> dict[str, Any]:
        defaults: dict[str, Any] = {}
        for f in dataclasses.fields(obj):  # type: ignore[arg-type]
            if f.default is not dataclasses.MISSING:
                defaults[f.name] = f.default
            elif f.default_factory in (list, dict):
                defaults[f.name] = {} if f.default_factory is dict else []
        return {k: v for k, v in vars(obj).items() if k not in apart and defaults.get(k, reference) != v}

    full = saga("t1", 4, WorkflowState.COMPENSATING)
    full.error, full.cancel_requested, full.stage, full.parked = "boom", True, 2, "why"
    full.late_runs["c"] = LateCompensation("a", command_id="c")
    full.step("a").status = StepStatus.SUCCEEDED
    full.step("a").dispatched_at = 3.5
    full.step("b")
    for s in (full, saga("t2", 1), SagaContext("t3", "w")):
        assert packing._saga_fields(vars(s)) == reference(s, packing._IN_RECORD)
        for rt in s.steps.values():
            assert packing._step_fields(vars(rt)) == reference(rt)
    assert packing._step_fields(vars(full.step("b"))) == {}


def test_the_head_of_a_runs_command_ids_is_one_byte_and_reads_back_beside_a_users_run_id_key() -> None:
    run = saga('t"1', 3, WorkflowState.RUNNING)
    run.run_id = "0f3a9c"
    tx = run.transaction_id
    run.data.update({"run_id": "not the saga's", "note": f"{tx}:0f3a9c:looks like a command id"})
    # A user's keys and values spelled like the ones written as one byte read back as they were.
    run.data.update({"status": "succeeded", "steps": {"data": {"attempt": 3}}, "x": ":execute::compensate:"})
    run.step_results["a"] = {"run_id": "nor this"}
    run.step("a").command_id = f"{tx}:0f3a9c:a:execute:1"
    run.step("a").succeeded_command = f"{tx}:0f3a9c:a:execute:1"
    body = compact_json(run)
    assert body.count(b"0f3a9c") == 1  # the run id is written once, in its own field
    record = b"".join(
        b"%d:%s" % (len(f), f)
        for f in (b"3", b"running", run.workflow_id.encode(), event_digest("e").encode())
    )
    assert SagaContext.from_json(saga_json(tx, record + body)) == run


def test_a_record_is_its_fields_then_the_saga() -> None:
    fields, ctx = load_record(b"1:7" + b"7:running" + b"3:o:s" + b"0:" + b'{"x":1}')
    assert fields == [b"7", b"running", b"o:s", b""] and len(fields) == len(RecordField)
    assert ctx == b'{"x":1}'
    for bad in (b"", b"x:1", b"9:short", b"1:7" + b"99:running"):
        with pytest.raises(ValueError):
            load_record(bad)


def realistic(tx: str, version: int, n: int) -> TransitionWrite:
    """A write as the orchestrator makes one: a running saga with a completed step, a command, its
    timeout timer, and the previous timer cancelled."""
    ctx = SagaContext(
        transaction_id=tx,
        workflow_id="order-fulfilment",
        state=WorkflowState.RUNNING,
        current_step="charge",
        data={"order_id": f"o-{n}", "amount": 129.5, "currency": "EUR", "items": ["a", "b", "c"]},
        step_results={"reserve": {"reservation": f"r-{n}"}},
        version=version + 1,
        completed=["reserve"],
    )
    ctx.step("reserve").status = StepStatus.SUCCEEDED
    runtime = ctx.step("charge")
    runtime.status = StepStatus.RUNNING
    runtime.attempt = 1
    runtime.command_id = f"cmd-{tx}-{version}"
    value = (
        b'{"schema_version":"1.0","type":"command","transaction_id":"%s","step":"charge",'
        b'"command_id":"cmd-%d","attempt":1,"data":{"order_id":"o-%d","amount":129.5}}' % (tx.encode(), n, n)
    )
    return TransitionWrite(
        f"ev-{tx}-{version}",
        tx,
        version,
        ctx,
        outbox=(
            OutboxMessage(
                "saga.commands.payments", tx, value, (("traceparent", b"00-" + b"a" * 32 + b"-01"),)
            ),
        ),
        timers=(
            Timer(f"tm-{tx}-{version}", tx, time.time() + 30, "timeout", "charge", "execute", 1, f"cmd-{n}"),
        ),
        cancel_timers=(f"tm-{tx}-{version - 1}",),
    )


def test_stored_json_round_trips() -> None:
    """The stored form reads back as the same saga, and unknown fields (a newer writer's) are ignored."""
    with_late = saga("t3", 2)
    with_late.late_runs["t3:a:compensate:late-1"] = LateCompensation("a", 2, None, "t3:x:retry", "Boom: no")
    for ctx in (saga("t1", 1), realistic("t2", 3, 7).saga, with_late):
        assert ctx is not None
        assert SagaContext.from_json(ctx.to_json()) == ctx
        newer = orjson.loads(ctx.to_json()) | {"field_of_a_newer_version": [1]}
        assert SagaContext.from_json(orjson.dumps(newer)) == ctx


# ---------------------------------------------------------------- settings and connections


def test_default_url_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://example.invalid:6399/3")
    made = RedisStateStore()
    kwargs = made._client.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("example.invalid", 6399, 3)
    assert kwargs["socket_timeout"] == 10.0
    monkeypatch.delenv("REDIS_URL")
    kwargs = RedisStateStore()._client.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"]) == ("localhost", 6379)
    with pytest.raises(ValidationError):
        RedisStateStore(dedupe_ttl=0)


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_unreachable_redis_raises_state_store_error() -> None:
    dead = RedisStateStore(f"redis://127.0.0.1:{_unused_port()}/0", key_prefix="dead")
    started = time.monotonic()
    for call in every_method(dead):
        with pytest.raises(StateStoreError) as info:
            await call()
        assert info.value.__cause__ is not None
        assert "Connection" in str(info.value)
    assert time.monotonic() - started < 10.0
    await dead.close()


def test_start_up_nodes_from_a_url_list_and_startup_nodes() -> None:
    from orchestrator_kafka.backends.redis.connect import parse_target

    target = parse_target("redis://:pw@a:7000/0, b:7001,rediss://c", ["d:7003", "redis://e:7004"])
    assert target.nodes == [("a", 7000), ("b", 7001), ("c", 6379), ("d", 7003), ("e", 7004)]
    assert target.urls[1] == "redis://b:7001"  # a bare host:port takes the first URL's scheme
    for bad in ("", "http://a:1", "redis://a:port"):
        with pytest.raises(ValidationError):
            parse_target(bad)
    with pytest.raises(ValidationError, match="min_replicas"):
        RedisStateStore(min_replicas=-1)
    with pytest.raises(ValidationError, match="wait_timeout"):
        RedisStateStore(wait_timeout=0)
    made = RedisStateStore("redis://a:7000,b:7001", cluster=True, min_replicas=2)
    assert (made.cluster, made.min_replicas) == (True, 2)  # told: nothing to ask on first use
    assert issubclass(NotReplicatedError, StateStoreError)
