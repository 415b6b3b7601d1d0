"""Dead letters: every kind of message the orchestrator or a worker cannot handle goes to the dead-letter
topic once, with its original bytes and headers plus the reason and its source topic, partition and
offset; its offset is committed (a restarted orchestrator does not dead-letter it again); the good
messages around it are handled; and each reason is logged."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from orchestrator_kafka import codec
from orchestrator_kafka.models import StartBody, StartSaga

from .harness import World

pytestmark = [pytest.mark.reliability, pytest.mark.kafka, pytest.mark.redis]


def start_request(tx: str, **changes: Any) -> dict[str, Any]:
    request = StartSaga(
        event_id=str(uuid.uuid4()),
        transaction_id=tx,
        workflow_id="rel",
        occurred_at=datetime.now(UTC),
        body=StartBody(context={"plan": "ok"}),
    )
    raw: dict[str, Any] = orjson.loads(codec.encode(request))
    raw.update(changes)
    return raw


def result_for(tx: str) -> dict[str, Any]:
    return {
        "schema_version": "1.0",
        "event_id": str(uuid.uuid4()),
        "event_type": "step.result",
        "transaction_id": tx,
        "workflow_id": "rel",
        "occurred_at": "2026-01-01T00:00:00Z",
        "body": {
            "command_id": f"{tx}:reserve:execute:1",
            "step": "reserve",
            "kind": "execute",
            "attempt": 1,
            "status": "succeeded",
            "result": {},
        },
    }


def poison(world: World, key: str) -> list[tuple[str, bytes | None, str]]:
    """(topic, value, expected reason) of every kind of bad message."""
    start, results = f"{world.prefix}.start", f"{world.prefix}.results"
    commands = f"{world.prefix}.commands.rel_ship"
    missing = start_request(key)
    del missing["transaction_id"]
    big = orjson.dumps(start_request(key, body={"context": {"pad": "x" * 1_000_100}}))
    return [
        (start, b'{"event_type": "saga.start", "transaction_id": ', codec.MALFORMED_JSON),
        (start, b'\xff\xfe{"event_type": 1}', codec.INVALID_UTF8),
        (start, orjson.dumps(start_request(key, event_type="saga.explode")), codec.UNKNOWN_EVENT_TYPE),
        (start, orjson.dumps(start_request(key, schema_version="2.0")), codec.UNSUPPORTED_SCHEMA_VERSION),
        (start, orjson.dumps(missing), codec.INVALID_MESSAGE),
        (start, orjson.dumps(start_request(key, body={"context": "not a dict"})), codec.INVALID_MESSAGE),
        (start, b"[1, 2, 3]", codec.NOT_AN_OBJECT),
        (start, None, codec.NULL_VALUE),
        (start, big, codec.OVERSIZED),
        # So close to the broker's limit that the reason headers do not fit beside it: the dead letter's
        # value is cut (regression: its publish failed for ever, blocking the partition).
        (start, b"x" * 1_048_400, codec.OVERSIZED),
        (start, orjson.dumps(result_for(key)), codec.UNEXPECTED_EVENT_TYPE),
        (results, orjson.dumps(result_for(f"{key}-nobody")), codec.UNKNOWN_TRANSACTION),
        (results, b"{nope", codec.MALFORMED_JSON),
        (results, None, codec.NULL_VALUE),
        # The Worker SDK does the same for the commands it cannot parse.
        (commands, b"not json at all", codec.MALFORMED_JSON),
        (commands, orjson.dumps(start_request(key)), codec.UNEXPECTED_EVENT_TYPE),
        (commands, None, codec.NULL_VALUE),
    ]


@pytest.mark.timeout(240)
async def test_every_kind_of_bad_message_is_dead_lettered_once_and_the_good_ones_flow(world: World) -> None:
    orchestrator, _ = await world.up(orchestrators=1, workers=1, REL_SESSION_MS="6000")
    before = await world.submit(["ok"] * 50)
    key = before[0]  # the bad messages share a partition with this saga's messages
    producer = AIOKafkaProducer(bootstrap_servers=world.bootstrap, max_request_size=4 * 1024 * 1024)
    await producer.start()
    sent: dict[tuple[str, int, int], tuple[bytes | None, str]] = {}
    try:
        for n, (topic, value, reason) in enumerate(poison(world, key)):
            meta = await producer.send_and_wait(
                topic, value, key=key.encode(), headers=[("x-test", str(n).encode())]
            )
            sent[topic, meta.partition, meta.offset] = (value, reason)
    finally:
        await producer.stop()
    after = await world.submit(["ok", "fail"] * 25)
    ids = [*before, *after]

    report = await world.verify(ids, dead_letters=len(sent))
    assert report.states == {"completed": 75, "compensated": 25}
    dlq = await world.topic(f"{world.prefix}.dlq")
    seen: set[tuple[str, int, int]] = set()
    for m in dlq:
        headers = dict(m.headers)
        where = (
            headers["dlq.source.topic"].decode(),
            int(headers["dlq.source.partition"]),
            int(headers["dlq.source.offset"]),
        )
        assert where in sent and where not in seen, where
        seen.add(where)
        value, reason = sent[where]
        assert headers["dlq.reason"].decode() == reason, (where, headers)
        if "dlq.truncated" in headers:
            assert value is not None and int(headers["dlq.truncated"]) == len(value) > len(m.value or b"")
            assert m.value == value[: len(m.value or b"")]
        else:
            assert m.value == (value or b"")  # the original bytes
        assert m.key == key.encode()
        assert "x-test" in headers  # the original headers
    assert seen == set(sent)
    assert sum("dlq.truncated" in dict(m.headers) for m in dlq) == 1

    # The bad messages' offsets were committed: a new orchestrator dead-letters none of them again.
    await orchestrator.terminate()
    await world.up(orchestrators=1, workers=0)
    more = await world.submit(["ok"] * 5)
    await world.wait_final(more)
    await asyncio.sleep(1)
    assert len(await world.topic(f"{world.prefix}.dlq")) == len(sent)
    admin = AIOKafkaAdminClient(bootstrap_servers=world.bootstrap)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(f"{world.prefix}.orchestrator")
    finally:
        await admin.close()
    for topic, partition, offset in sent:
        if not topic.endswith((".start", ".results")):
            continue
        tp = next(tp for tp in committed if tp.topic == topic and tp.partition == partition)
        assert committed[tp].offset > offset

    logged = "".join(p.output() for p in world.procs)
    for _, _, reason in poison(world, key):
        assert f": {reason} (" in logged, f"no log line for {reason}"
