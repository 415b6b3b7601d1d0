"""RedisStateStore on a full Redis (a private redis-server, ``maxmemory`` 4 MB, ``noeviction``), and its
start-up check of ``maxmemory-policy`` (issue 12, item 6)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from orchestrator_kafka.backends.redis import RedisStateStore
from orchestrator_kafka.backends.redis.partitions import partition_of
from orchestrator_kafka.errors import ConfigurationError, StateStoreError, StoreFullError

from ..contract.test_state_store import create, msg, step, timer
from ..private_redis import cmd, fill, free, private_redis

pytestmark = pytest.mark.redis


@pytest.fixture
def url() -> Iterator[str]:
    with private_redis() as address:
        yield address


@pytest.fixture
async def store(url: str) -> AsyncIterator[RedisStateStore]:
    made = RedisStateStore(url, partitions=4)
    try:
        yield made
    finally:
        await made.close()


async def test_a_full_redis_refuses_a_whole_batch_and_takes_it_once_it_has_room(
    store: RedisStateStore, url: str
) -> None:
    await store.apply([create("t1", outbox=(msg(1),))])
    assert await fill(url) > 0
    batch = [step("t1", 1, "e2", outbox=(msg(2),)), create("t2", timers=(timer("t2", "tm", 5.0),))]
    with pytest.raises(StoreFullError, match="apply") as refused:
        await store.apply(batch)
    assert isinstance(refused.value, StateStoreError)  # whoever handles store failures handles this
    # Nothing of the batch was written, and what was there is still readable.
    t1 = await store.load_context("t1")
    assert t1 is not None and t1.version == 1
    assert await store.load_context("t2") is None
    assert [p.outbox_id for p in await store.pending_outboxes()] == [1]
    # Refused again, as often as it is tried, while Redis stays full.
    with pytest.raises(StoreFullError):
        await store.apply(batch)
    await free(url)
    results = await store.apply(batch)
    assert [r.status for r in results] == ["applied", "applied"]
    t1 = await store.load_context("t1")
    assert t1 is not None and t1.version == 2


async def test_claiming_due_timers_on_a_full_redis_is_refused_and_claims_nothing(
    store: RedisStateStore, url: str
) -> None:
    await store.apply([create("t1", timers=(timer("t1", "tm", 5.0),))])
    await fill(url)
    assert await store.claim_due_timers(1.0, 10, 30.0) == []  # nothing due: nothing to write
    with pytest.raises(StoreFullError, match="claim"):
        await store.claim_due_timers(10.0, 10, 30.0)
    await free(url)
    assert [t.timer_id for t in await store.claim_due_timers(10.0, 10, 30.0)] == ["tm"]


async def test_an_unrelated_redis_error_is_not_taken_for_a_full_one(store: RedisStateStore, url: str) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        # A hash where the saga's record (a string) goes: WRONGTYPE, not OOM.
        where = store.keys.saga(partition_of("t1", 4), "t1")
        await cmd(client, "HSET", where, "field", "value")
    finally:
        await client.aclose()
    with pytest.raises(StateStoreError) as failed:
        await store.apply([create("t1")])
    assert not isinstance(failed.value, StoreFullError)


async def test_check_accepts_noeviction(store: RedisStateStore) -> None:
    await store.check()


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-ttl", "allkeys-random"])
async def test_check_refuses_an_evicting_policy_naming_it(
    store: RedisStateStore, url: str, policy: str
) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        await cmd(client, "CONFIG", "SET", "maxmemory-policy", policy)
    finally:
        await client.aclose()
    with pytest.raises(ConfigurationError, match=f"maxmemory-policy '{policy}'.*noeviction"):
        await store.check()


async def test_check_passes_with_a_warning_where_config_is_not_allowed(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        # An evicting policy the check cannot see: a user whose ACL forbids CONFIG (a managed Redis).
        await cmd(client, "CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
        await cmd(client, "ACL", "SETUSER", "app", "on", ">secret", "~*", "&*", "+@all", "-config")
    finally:
        await client.aclose()
    limited = RedisStateStore(url.replace("redis://", "redis://app:secret@"), partitions=4)
    try:
        with caplog.at_level(logging.WARNING, logger="orchestrator_kafka.redis"):
            await limited.check()
        assert "cannot read Redis's maxmemory-policy" in caplog.text
        assert "noeviction" in caplog.text
        await limited.apply([create("t1")])  # and the store works
    finally:
        await limited.close()
