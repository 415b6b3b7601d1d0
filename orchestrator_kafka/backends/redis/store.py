"""The Redis state store: :class:`RedisStateStore`.

Its key layout is :class:`~.keys.RedisKeys`; what it sends and stores is in :mod:`.packing`. Every
write goes through one Lua script (``scripts.lua``, see :mod:`.script`), called with EVALSHA and loaded
on NOSCRIPT. :meth:`RedisStateStore.apply` applies a whole batch of transitions in one script call, each
still checked and applied on its own: one call per batch, not one per event, is what keeps the client's
CPU per transition in the tens of microseconds (DESIGN section 7).

A script runs atomically: no other client sees half of it, and a Redis that dies during a call has
applied all of the call or none of it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, Final, cast

import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.client import NEVER_DECODE
from redis.exceptions import NoScriptError, OutOfMemoryError, ResponseError

from ...constants import (
    DEDUPE_TTL_SECONDS,
    DEFAULT_FAILED_RETENTION_SECONDS,
    DEFAULT_KEY_PREFIX,
    DEFAULT_REDIS_URL,
    DEFAULT_RETENTION_SECONDS,
    DEFAULT_WAIT_TIMEOUT,
    ENV_REDIS_URL,
    TIMER_RECHECK_SECONDS,
)
from ...context import SagaContext, WorkflowState, storable
from ...errors import ConfigurationError, StateStoreError, StoreFullError, ValidationError
from ...paging import DEFAULT_PAGE_LIMIT, merge_page, page_query
from ...ports import IStateStore
from ...values import ApplyResult, PendingOutbox, Timer, TransitionWrite
from ..retention import check_retention
from .acks import HOLD_SECONDS, Held, HeldAcks
from .connect import FAILURES, Client, close_client, connect, is_cluster, parse_target, server_client
from .due import DueTimes
from .keys import RedisKeys
from .packing import (
    STATUS,
    Messages,
    Outcome,
    compact_json,
    epoch_ms,
    load_timer,
    messages_of,
    pack,
    pack_acks,
    saga_json,
)
from .partitions import partition_of
from .replication import Replicas, default_min_replicas, load_everywhere
from .script import SCRIPT, SHA

__all__ = ["RedisStateStore"]


def _text(value: bytes | str) -> str:
    # A client passed in may decode replies itself (decode_responses=True): every stored value is UTF-8.
    return value if isinstance(value, str) else value.decode()


_log = logging.getLogger("orchestrator_kafka.redis")


def _failed(op: str, exc: Exception) -> StateStoreError:
    """The store error for a Redis failure; a write refused for memory is a :class:`StoreFullError`."""
    message = f"Redis state store: {op} failed: {type(exc).__name__}: {exc}"
    # redis-py makes OutOfMemoryError of a bare OOM reply only; one from inside a script carries the
    # script's name after it, and comes as a plain ResponseError.
    if isinstance(exc, OutOfMemoryError) or (
        isinstance(exc, ResponseError) and "command not allowed when used memory" in str(exc)
    ):
        return StoreFullError(message)
    return StateStoreError(message)


def _wrote(reply: Any) -> bool:
    """Whether an apply reply shows the call wrote, or had nothing to guard: only duplicates (their
    outboxes published again) with no write beside them need a barrier before WAIT (replication.py)."""
    statuses = {r[0] for r in reply}
    return Outcome.APPLIED in statuses or Outcome.DUPLICATE not in statuses


def _always(reply: Any) -> bool:
    return True


def _corrupt(op: str, exc: Exception) -> StateStoreError:
    return StateStoreError(f"Redis state store: {op}: a stored entry or the reply cannot be decoded: {exc}")


class RedisStateStore(IStateStore):
    """A state store in Redis: versioned atomic transitions, event dedupe, outboxes, timers, indexes.

    ``url`` defaults to the ``REDIS_URL`` environment variable, else ``redis://localhost:6379/0``; pass
    ``client`` to use a client of your own, one server's or a ``redis.asyncio.cluster.RedisCluster``
    (then :meth:`close` leaves it open).

    **Redis Cluster.** On first use the store asks the first start-up node that answers whether it runs
    in cluster mode (``INFO cluster``), and on a cluster works through redis-py's cluster client, with
    the same API and guarantees; ``cluster=True`` (or False) says so instead of asking. Start-up nodes
    are ``url`` (one URL, or several separated by commas; any node of the cluster will do) and
    ``startup_nodes`` (URLs or ``host:port``): name several, and a store starting while one is down
    still connects. Every key one script call touches is one partition's, so in one slot.

    **Replicas.** After each write (:meth:`apply`, :meth:`save_context`, :meth:`delete_context`) the store
    waits, with Redis ``WAIT``, until ``min_replicas`` replicas of the primary that took it have it, for
    at most ``wait_timeout`` seconds; fewer is a failed write (:class:`NotReplicatedError`), never a
    silent pass. ``min_replicas=None`` (the default) is decided on first use: 1 when every primary has a
    replica connected, else 0 (0 waits for nothing). It narrows what a failover can lose; it does not
    make Redis linearizable (see :mod:`.replication`). A saga's record
    remembers its last ``EVENTS_KEPT`` (16) applied events, as digests, to recognise a redelivered one;
    an older duplicate is the engine's to recognise from the saga itself. A deleted saga's recent
    events stay known for ``dedupe_ttl`` seconds.

    A saga's keys expire ``retention`` seconds after it ends (completed, compensated or cancelled), or
    ``failed_retention`` after it fails; None keeps them for ever, and an unfinished saga never expires.
    Once expired, :meth:`load_context` returns None and a start under its id begins a new saga;
    :meth:`trim` (the orchestrator's housekeeping) takes its id out of the indexes. A store of its own making
    fails fast on a dead Redis (5 s to connect, 10 s per reply) and retries a dropped connection once.

    Every method raises :class:`~orchestrator_kafka.errors.StateStoreError` when Redis fails or cannot
    be reached, or returns what cannot be decoded; a failed write has written nothing (:meth:`apply`
    says the one exception). Its keys follow the sagas' Kafka partitions (:class:`~.keys.RedisKeys`),
    so each script call touches one Redis Cluster slot; the partition count is recorded at first start
    (:meth:`use_partitions`, which the orchestrator calls with its topics' count) and a store made
    without ``partitions`` (a client's) reads it from there.

    Raises:
        ValidationError: ``dedupe_ttl`` is not positive, a retention is not a positive whole number of
            seconds or None, ``partitions`` is not a positive whole number, ``key_prefix`` is empty
            or holds a brace, a start-up node is not a Redis URL, ``min_replicas`` is not a whole
            number of at least 0 or None, or ``wait_timeout`` is not positive.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        retention: int | None = DEFAULT_RETENTION_SECONDS,
        failed_retention: int | None = DEFAULT_FAILED_RETENTION_SECONDS,
        partitions: int | None = None,
        client: Client | None = None,
        dedupe_ttl: int = DEDUPE_TTL_SECONDS,
        startup_nodes: Sequence[str] = (),
        cluster: bool | None = None,
        min_replicas: int | None = None,
        wait_timeout: float = DEFAULT_WAIT_TIMEOUT,
    ) -> None:
        if partitions is not None and (
            isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1
        ):
            raise ValidationError(f"partitions must be a whole number of at least 1, not {partitions!r}")
        # The partition count asked for (None: the recorded one), and the one in use once known.
        self._wanted = partitions
        self._count: int | None = None
        self._next_claim = 0
        # What this store knows of each partition's earliest timer: see claim_due_timers.
        self._due = DueTimes(TIMER_RECHECK_SECONDS)
        if dedupe_ttl <= 0:
            raise ValidationError(f"dedupe_ttl must be a positive number of seconds, not {dedupe_ttl!r}")
        self.retention: Final = check_retention("retention", retention)
        self.failed_retention: Final = check_retention("failed_retention", failed_retention)
        # As the script takes them: seconds, '0' for for ever.
        self._retain = (str(retention or 0), str(failed_retention or 0))
        self._keys = RedisKeys(key_prefix)
        self._ttl = str(int(dedupe_ttl))
        if min_replicas is not None and (
            isinstance(min_replicas, bool) or not isinstance(min_replicas, int) or min_replicas < 0
        ):
            raise ValidationError(f"min_replicas must be a whole number of at least 0, not {min_replicas!r}")
        if not wait_timeout > 0:
            raise ValidationError(f"wait_timeout must be a positive number of seconds, not {wait_timeout!r}")
        self._min_replicas = min_replicas
        self._wait_ms = max(1, round(wait_timeout * 1000))  # WAIT's 0 would wait for ever
        self._owned = client is None
        self._closed = False
        self._target = parse_target(url or os.environ.get(ENV_REDIS_URL) or DEFAULT_REDIS_URL, startup_nodes)
        self._cluster = cluster if client is None else is_cluster(client)
        if client is None:
            # One server's client, made now (it connects on first use); replaced on first use by a
            # cluster client if the server says it runs in cluster mode.
            client = server_client(self._target.urls[0])
        self._client: Client = client
        self._connecting: asyncio.Lock | None = None
        self._replicas: Replicas | None = None  # with min_replicas, once connected
        self._ready = False
        # Until the first call has found out what Redis is (connect()), every command goes there first;
        # then straight to the client. redis-py leaves execute_command untyped; every reply here is
        # decoded by its caller.
        self._execute: Callable[..., Awaitable[Any]] = self._first_execute
        # The acknowledgements of published entries, until the next write of their partition takes them.
        self._held = HeldAcks(self._send_acks, HOLD_SECONDS)

    @property
    def key_prefix(self) -> str:
        """The prefix of every key this store uses."""
        return self._keys.prefix

    @property
    def keys(self) -> RedisKeys:
        """The names of the keys this store uses (for operators and tests)."""
        return self._keys

    @property
    def min_replicas(self) -> int | None:
        """How many replicas must acknowledge each write; None until found out on first use."""
        return self._min_replicas

    @property
    def cluster(self) -> bool | None:
        """Whether Redis is a Redis Cluster; None until found out on first use."""
        return self._cluster

    # ------------------------------------------------------------ plumbing

    async def connect(self) -> None:
        """Find out what Redis is, once: a cluster or one server (unless told), and ``min_replicas``
        (unless given); load the script on every node. Every method does this first by itself.

        Raises:
            StateStoreError: Redis failed, or no start-up node answered.
            ValidationError: a cluster named with a database other than 0.
        """
        self._check_open()
        if self._ready:
            return
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._ready:
                return
            try:
                client = self._client
                if self._owned:
                    made = cast("aioredis.Redis", client)
                    client = await connect(self._target, self._cluster, made)
                    if client is not made:
                        self._client = client
                        await made.aclose()
                self._cluster = is_cluster(client)
                if self._min_replicas is None:
                    self._min_replicas = await default_min_replicas(client)
                if self._min_replicas:
                    self._replicas = Replicas(client, self._min_replicas, self._wait_ms)
                await load_everywhere(client, SCRIPT)
            except FAILURES as exc:
                raise _failed("connect", exc) from exc
            self._execute = cast("Callable[..., Awaitable[Any]]", client.execute_command)
            self._ready = True

    async def _first_execute(self, *args: Any, **options: Any) -> Any:
        await self.connect()
        return await self._execute(*args, **options)

    async def _write(
        self, op: str, partition: int, *args: str | bytes | int, wrote: Callable[[Any], bool] = _always
    ) -> Any:
        """Run ``op`` of the store's script on ``partition``'s keys as :meth:`_script` does; with
        ``min_replicas``, on the same connection then WAIT for them (replication.py), and raise
        :class:`NotReplicatedError` when fewer acknowledge it in time. ``wrote``: see
        :meth:`~.replication.Replicas.write_and_wait`."""
        if not self._ready:
            await self.connect()
        replicas = self._replicas
        if replicas is None:
            return await self._script(op, partition, *args)
        self._check_open()
        tagged = self._keys.tagged(partition)
        slot_key = self._keys.outboxes(partition)
        try:
            return await replicas.write_and_wait(
                slot_key,
                ("EVALSHA", SHA, 1, slot_key, op, tagged, *args),
                SCRIPT,
                barrier_key=self._keys.barrier(partition),
                wrote=wrote,
            )
        except FAILURES as exc:
            raise _failed(op, exc) from exc

    def _check_open(self) -> None:
        if self._closed:
            raise StateStoreError("the Redis state store is closed")

    async def _script(self, op: str, partition: int, *args: str | bytes | int) -> Any:
        """Run ``op`` of the store's script on ``partition``'s keys: EVALSHA, loading the script on
        NOSCRIPT."""
        self._check_open()
        tagged = self._keys.tagged(partition)
        # One key of the partition declared (the script reads none of KEYS): what a Redis Cluster client
        # routes the call by, to the node of the partition's slot, where every key it touches lives.
        slot_key = self._keys.outboxes(partition)
        execute = self._execute
        # Replies stay bytes even for a client that decodes responses: outbox entries hold raw bytes.
        raw = {NEVER_DECODE: True}
        try:
            try:
                return await execute("EVALSHA", SHA, 1, slot_key, op, tagged, *args, **raw)
            except NoScriptError:
                # First use on this server, or after SCRIPT FLUSH / a restart / a failover to a replica
                # that never had it: NOSCRIPT means nothing ran. On a cluster SCRIPT LOAD has no key
                # to route it by: it goes to every node.
                await load_everywhere(self._client, SCRIPT)
                return await execute("EVALSHA", SHA, 1, slot_key, op, tagged, *args, **raw)
        except FAILURES as exc:
            raise _failed(op, exc) from exc

    async def use_partitions(self, count: int) -> None:
        """Use ``count`` partitions, the count of the topics the orchestrator consumes: recorded in Redis
        at first start, and checked against the record after that.

        Raises:
            ValidationError: Redis recorded another count (the topics were repartitioned, so Kafka maps
                sagas to other partitions than their keys are in), or this store was made for another.
            StateStoreError: Redis failed.
        """
        if self._wanted is not None and self._wanted != count:
            raise ValidationError(
                f"the topics have {count} partitions but this store was made for {self._wanted}"
            )
        self._wanted = count
        self._count = None
        await self._partition_count(write=True)

    async def _partition_count(self, *, write: bool) -> int | None:
        """The partition count in use: the recorded one; recorded first from the one asked for, for a
        write. None for a read before any count was recorded (no saga exists then).

        Raises:
            ValidationError: the recorded count is not the one asked for.
            StateStoreError: Redis failed, or a write has no count to go by.
        """
        if self._count is not None:
            return self._count
        key = self._keys.partitions
        if self._wanted is not None and write:
            await self._command("SET", key, self._wanted, "NX")
        recorded = await self._command("GET", key)
        if recorded is None:
            if write:
                raise StateStoreError(
                    f"Redis state store: no partition count is recorded under {key!r}: start an "
                    "orchestrator first, or make the store with partitions=<the topics' count>"
                )
            return None
        count = int(recorded)
        if self._wanted is not None and count != self._wanted:
            raise ValidationError(
                f"Redis recorded {count} partitions under {key!r} at first start, but the topics have "
                f"{self._wanted}: repartitioned topics map sagas to other partitions than their keys are "
                "in; use the recorded count, or another key prefix"
            )
        self._count = count
        return count

    async def _grouped(self, transaction_ids: Sequence[str], *, write: bool) -> dict[int, list[int]] | None:
        """The positions of ``transaction_ids`` by partition, or None before any count was recorded."""
        count = await self._partition_count(write=write)
        if count is None:
            return None
        groups: dict[int, list[int]] = {}
        for i, tx in enumerate(transaction_ids):
            groups.setdefault(partition_of(tx, count), []).append(i)
        return groups

    async def _each_partition(self, op: str, *args: str | bytes | int) -> list[Any]:
        """``op``'s reply from every partition, the calls made together; [] before any count."""
        count = await self._partition_count(write=False)
        if count is None:
            return []
        return list(await asyncio.gather(*(self._script(op, p, *args) for p in range(count))))

    async def _command(self, *args: str | bytes | int, raw: bool = False) -> Any:
        self._check_open()
        try:
            return await self._execute(*args, **({NEVER_DECODE: True} if raw else {}))
        except FAILURES as exc:
            raise _failed(str(args[0]), exc) from exc

    @staticmethod
    def _parse(transaction_id: str, raw: bytes) -> SagaContext:
        try:
            return SagaContext.from_json(saga_json(transaction_id, raw))
        except (ValidationError, ValueError) as exc:
            raise StateStoreError(
                f"the stored saga {transaction_id!r} is not a valid SagaContext: {exc}"
            ) from exc

    # ------------------------------------------------------------ sagas

    async def save_context(self, context: SagaContext) -> None:
        """Save or overwrite ``context`` as it is, version included (an operator's repair); the indexes
        follow its workflow and state.

        Raises:
            ValidationError: ``context`` is not a valid saga; nothing was written.
            StateStoreError: Redis failed; nothing was written.
            NotReplicatedError: too few replicas acknowledged it in time (``min_replicas``); it was
                written on the primary.
        """
        storable(context)
        count = await self._partition_count(write=True)
        assert count is not None  # a write has a count, or raised
        await self._write(
            "save",
            partition_of(context.transaction_id, count),
            context.transaction_id,
            context.version,
            compact_json(context),
            context.workflow_id,
            str(context.state),
            epoch_ms(context.updated_at),
            *self._retain,
        )

    async def load_context(self, transaction_id: str) -> SagaContext | None:
        """The saga ``transaction_id``, or None if it does not exist.

        Raises:
            StateStoreError: Redis failed, or the stored record is not a valid saga.
        """
        count = await self._partition_count(write=False)
        if count is None:
            return None
        key = self._keys.saga(partition_of(transaction_id, count), transaction_id)
        raw = await self._command("GET", key, raw=True)
        return None if raw is None else self._parse(transaction_id, raw)

    async def load_contexts(self, transaction_ids: Sequence[str]) -> dict[str, SagaContext]:
        """The sagas that exist among ``transaction_ids``, in one round trip.

        Raises:
            StateStoreError: Redis failed, or a stored record is not a valid saga.
        """
        if not transaction_ids:
            return {}
        ids = list(transaction_ids)
        groups = await self._grouped(ids, write=False)
        if groups is None:
            return {}
        calls = [self._script("load", p, *(ids[i] for i in at)) for p, at in groups.items()]
        found: dict[str, SagaContext] = {}
        for at, raws in zip(groups.values(), await asyncio.gather(*calls), strict=True):
            for i, raw in zip(at, raws, strict=True):
                if raw is not None:
                    found[ids[i]] = self._parse(ids[i], raw)
        return {tx: found[tx] for tx in ids if tx in found}

    async def delete_context(self, transaction_id: str) -> bool:
        """Delete the saga, its outbox, its timers and its index entries; True if the saga existed.

        Its recent event ids are kept for ``dedupe_ttl``, so a late redelivery is still a duplicate.

        Raises:
            StateStoreError: Redis failed; nothing was deleted.
            NotReplicatedError: too few replicas acknowledged it in time (``min_replicas``); it was
                deleted on the primary.
        """
        count = await self._partition_count(write=False)
        if count is None:
            return False
        return bool(
            await self._write("delete", partition_of(transaction_id, count), transaction_id, self._ttl)
        )

    async def list_contexts(self, workflow_id: str | None = None, state: str | None = None) -> list[str]:
        """Transaction ids of the sagas of ``workflow_id`` in ``state`` (None matches any), sorted. It
        reads every matching index whole; :meth:`list_sagas` pages.

        Raises:
            StateStoreError: Redis failed.
        """
        states = [s.value for s in WorkflowState] if state is None else [str(state)]
        replies = await self._each_partition("ids", workflow_id or "", *states)
        return sorted({_text(member) for found in replies for member in found})

    async def list_sagas(
        self,
        workflow_id: str | None = None,
        state: str | None = None,
        *,
        limit: int = DEFAULT_PAGE_LIMIT,
        cursor: str | None = None,
        updated_after: datetime | None = None,
        updated_before: datetime | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of saga statuses and the next page's cursor, as
        :meth:`~orchestrator_kafka.ports.IStateStore.list_sagas` says: two round trips, one script call
        reading ``limit`` members of each matching index and one load of the page's sagas.

        Raises:
            ValidationError: an unknown state, a malformed cursor, a bad limit or a naive bound.
            StateStoreError: Redis failed, or a stored record is not a valid saga.
        """
        q = page_query(
            workflow_id,
            state,
            limit=limit,
            cursor=cursor,
            updated_after=updated_after,
            updated_before=updated_before,
        )
        after_score, after_tx = ("", "") if q.after is None else (str(q.after[0]), q.after[1] or "")
        before = "" if q.before is None else str(q.before)
        replies = await self._each_partition(
            "page", q.workflow_id or "", q.limit, after_score, after_tx, before, *q.states
        )
        try:
            candidates = [
                (int(reply[i + 1]), _text(reply[i])) for reply in replies for i in range(1, len(reply), 2)
            ]
        except (ValueError, TypeError, IndexError) as exc:
            raise _corrupt("list_sagas", exc) from exc
        page, next_cursor = merge_page(candidates, q.limit, any(reply[0] for reply in replies))
        found = await self.load_contexts([tx for _, tx in page])
        # An index entry of a saga that expired, or that restarted under its id, until trim() runs.
        statuses = [
            saga.to_status()
            for _, tx in page
            if (saga := found.get(tx)) is not None
            and saga.state.value in q.states
            and (q.workflow_id is None or saga.workflow_id == q.workflow_id)
        ]
        return statuses, next_cursor

    async def trim(self, now: float) -> int:
        """Take out of the indexes the sagas that ended ``retention`` before ``now`` (epoch seconds), or
        failed ``failed_retention`` before it; return how many entries went. Their keys expire by
        themselves.

        Raises:
            StateStoreError: Redis failed.
        """
        bounds = [
            "" if ttl is None else str(int((now - ttl) * 1000))
            for ttl in (self.retention, self.failed_retention)
        ]
        return sum(int(removed) for removed in await self._each_partition("trim", *bounds))

    # ------------------------------------------------------------ transitions

    async def apply(self, writes: Sequence[TransitionWrite]) -> list[ApplyResult]:
        """Apply each write atomically and in order, one script call per partition the writes span (a
        batch the bus hands over is usually one partition's), the calls made together; one result per
        write.

        Per write: one of the saga's last 16 event ids (or a deleted saga's, for ``dedupe_ttl``) gives
        ``duplicate`` with the saga's current outbox; a stored version other than ``expected_version``
        (0: the saga must not exist) gives ``conflict``, as does every later write of a transaction that
        conflicted earlier in the batch; a write without a saga gives ``unchanged`` after cancelling its
        ``cancel_timers``; otherwise the saga (its record, with the expiry its state gives it), indexes,
        outbox entry (id = the new version), timers, cancellations and event id are written and the
        result is ``applied`` with the write's own messages (older unacknowledged entries are left to
        their writer and to the recovery sweep).

        Raises:
            ValidationError: a write's saga is not its transaction's, not at ``expected_version + 1``, or
                cannot be stored; the whole batch is refused (checked before anything is sent, so
                nothing is written).
            StateStoreError: Redis failed. A lost connection or a Redis out of memory leaves each
                partition's writes written entirely or not at all (a script is atomic, and Redis
                refuses a script's first write, not a later one, when memory is full), though one
                partition's may be written and another's not; a script error half way (a key of the
                wrong type written by someone else) keeps the writes before it. Both are safe:
                redelivered, the writes that were made come back as duplicates.
            NotReplicatedError: with ``min_replicas``, fewer replicas acknowledged the writes within
                ``wait_timeout``: they stand on the primary but are not taken as written (a failover
                could lose them); retried, they come back as duplicates, and count once the replicas
                have them.
        """
        if not writes:
            return []
        groups = await self._grouped([w.transaction_id for w in writes], write=True)
        assert groups is not None  # a write has a count, or raised
        # Every partition's writes are packed, so checked, before any is sent.
        try:
            packed = [(p, *pack([writes[i] for i in at])) for p, at in groups.items()]
        except orjson.JSONEncodeError as exc:  # an id
            raise ValidationError(f"a write cannot be encoded: {exc}") from exc
        # The timers written lower what claim_due_timers knows of their partition's earliest one.
        for p, at in groups.items():
            for i in at:
                if writes[i].timers:
                    self._due.wrote(p, writes[i].timers)
        # Each call also carries the acknowledgements held for its partition (HeldAcks).
        taken: list[Held] = []
        calls = []
        for p, batch, data in packed:
            held = self._held.take(p)
            acks = b""
            if held is not None:
                taken.append(held)
                acks = held.packed
            calls.append(self._write("apply", p, batch, data, *self._retain, acks, wrote=_wrote))
        try:
            by_partition = await asyncio.gather(*calls)
        except Exception as exc:
            for held in taken:
                held.settle(exc)
            raise
        except BaseException:
            for held in taken:
                held.settle(StateStoreError("the write carrying outbox acknowledgements was cancelled"))
            raise
        for held in taken:
            held.settle()
        replies: list[Any] = [None] * len(writes)
        for at, got in zip(groups.values(), by_partition, strict=True):
            if len(got) != len(at):
                raise StateStoreError(f"Redis state store: {len(got)} results for {len(at)} writes")
            for i, reply in zip(at, got, strict=True):
                replies[i] = reply
        cache: dict[bytes, Messages] = {}
        results: list[ApplyResult] = []
        try:
            for w, reply in zip(writes, replies, strict=True):
                status = STATUS[reply[0]]
                if status == "applied":
                    outbox_id = int(reply[1])
                    results.append(
                        ApplyResult(status, w.transaction_id, outbox_id, w.outbox if outbox_id else ())
                    )
                elif len(reply) == 1:
                    results.append(ApplyResult(status, w.transaction_id))
                elif len(reply) == 2:
                    results.append(ApplyResult(status, w.transaction_id, reply[1]))
                else:
                    messages = messages_of(reply[2:], cache)
                    results.append(ApplyResult(status, w.transaction_id, reply[1], messages))
        except (ValueError, TypeError, IndexError, KeyError) as exc:
            raise _corrupt("apply", exc) from exc
        return results

    # ------------------------------------------------------------ outboxes

    async def ack_outbox(self, acks: Sequence[tuple[str, int]], *, only: bool = False) -> None:
        """Forget each saga's outbox entries up to ``outbox_id`` (with ``only``, just that one), in one
        script call per partition. Acknowledgements ``only`` of their own entries (the orchestrator's,
        after each batch) wait up to 50 ms for the next write of their partition and go with it, so as
        not to cost a call of their own (:mod:`.acks`); this returns once they are in Redis.

        Raises:
            ValidationError: an outbox id is not a whole number.
            StateStoreError: Redis failed; the acknowledgements of a partition whose call failed were
                not made.
        """
        if not acks:
            return
        groups = await self._grouped([tx for tx, _ in acks], write=False)
        if groups is None:
            return
        packed = {p: pack_acks([acks[i] for i in at]) for p, at in groups.items()}
        if only:
            held = {self._held.hold(p, data) for p, data in packed.items()}
            # Shielded: a future is shared by every caller of its partition, and one caller cancelled
            # must not cancel the others' acknowledgements.
            await asyncio.gather(*(asyncio.shield(sent) for sent in held))
            return
        await asyncio.gather(*(self._script("ack", p, data, "0") for p, data in packed.items()))

    async def _send_acks(self, partition: int, acks: bytes) -> None:
        """Send held acknowledgements of ``partition`` (each of its entry alone) in a call of their own."""
        await self._script("ack", partition, acks, "1")

    async def pending_outboxes(self, limit: int = 1000) -> list[PendingOutbox]:
        """Up to ``limit`` sagas whose outbox is not empty, each with all its messages, oldest first.

        Raises:
            StateStoreError: Redis failed.
        """
        if limit <= 0:
            return []
        count = await self._partition_count(write=False)
        replies: list[Any] = []
        for p in range(count or 0):
            replies.extend(await self._script("pending", p, int(limit - len(replies))))
            if len(replies) >= limit:
                break
        cache: dict[bytes, Messages] = {}
        try:
            return [
                PendingOutbox(_text(reply[0]), int(reply[1]), messages_of(reply[2:], cache))
                for reply in replies
            ]
        except (ValueError, TypeError) as exc:
            raise _corrupt("pending_outboxes", exc) from exc

    # ------------------------------------------------------------ timers

    async def claim_due_timers(self, now: float, limit: int, lease: float) -> list[Timer]:
        """Claim up to ``limit`` timers due by ``now``, earliest first.

        Each claimed timer is rescheduled to ``now + lease``: hidden from other claims until then, and
        due again if whoever claimed it dies. Only a write's ``cancel_timers`` deletes it. A partition
        whose earliest timer this store knows (from its last claim there and the timers it wrote since)
        is not due is skipped for up to ``TIMER_RECHECK_SECONDS``, so a timer written by another store
        may fire up to that much late.

        Raises:
            StateStoreError: Redis failed; nothing was claimed.
        """
        if limit <= 0:
            return []
        count = await self._partition_count(write=False) or 0
        entries: list[Any] = []
        # Partition by partition until the limit, from a different one each time, so that a partition
        # with many due timers does not hold back the others' for good.
        start, self._next_claim = self._next_claim, self._next_claim + 1
        now = float(now)
        for k in range(count):
            p = (start + k) % count
            # A partition whose earliest timer is known not to be due is asked again only after
            # TIMER_RECHECK_SECONDS: a timer this store writes lowers what it knows (apply), and one another
            # store wrote (another orchestrator, during a handover) is found by then. Idle, an
            # orchestrator then makes a call per partition a second, not one per partition a tick.
            if not self._due.to_ask(p, now):
                continue
            left = int(limit) - len(entries)
            self._due.asking(p)
            reply = await self._script("claim", p, repr(now), left, repr(now + float(lease)))
            self._due.answered(p, float(reply[0]) if reply and reply[0] else None, now)
            entries.extend(reply[1:])
            if len(entries) >= limit:
                break
        try:
            return [load_timer(entry) for entry in entries]
        except (ValueError, TypeError) as exc:
            raise _corrupt("claim_due_timers", exc) from exc

    # ------------------------------------------------------------ lifecycle

    async def check(self) -> None:
        """Refuse a Redis that evicts keys when full: it would drop sagas (running ones included)
        silently. Only ``noeviction`` is safe; then a full Redis refuses writes, and the orchestrator
        retries until memory frees. A server that does not allow ``CONFIG GET`` (a managed Redis, an
        ACL) cannot be checked: that is logged, and the check passes. On a Redis Cluster every node is
        asked, replicas included (a replica is promoted in a failover).

        Raises:
            ConfigurationError: ``maxmemory-policy`` is not ``noeviction`` (on a node of a cluster).
            StateStoreError: Redis could not be reached.
        """
        await self.connect()
        client = self._client
        # None: the one server; on a cluster, each node by its name.
        nodes: list[Any] = client.get_nodes() if isinstance(client, RedisCluster) else [None]
        for node in nodes:
            where = "Redis" if node is None else f"the Redis Cluster node {node.name}"
            whose = "Redis's" if node is None else f"{where}'s"
            target = {} if node is None else {"target_nodes": node}
            try:
                reply = await self._execute("CONFIG", "GET", "maxmemory-policy", **target)
            except ResponseError as exc:  # NOPERM from an ACL, or CONFIG renamed or disabled
                _log.warning(
                    "cannot read %s maxmemory-policy (%s): make sure it is noeviction, or a full Redis "
                    "will evict saga state",
                    whose,
                    exc,
                )
                return
            except FAILURES as exc:
                raise _failed("CONFIG GET maxmemory-policy", exc) from exc
            # CONFIG GET answers a flat [name, value] list (RESP2) or a map (RESP3); redis-py may make
            # either a dict.
            pairs = reply.items() if isinstance(reply, dict) else zip(reply[::2], reply[1::2], strict=True)
            policy = next((_text(v) for k, v in pairs if _text(k) == "maxmemory-policy"), None)
            if policy is None:
                _log.warning("%s did not report its maxmemory-policy: make sure it is noeviction", where)
            elif policy != "noeviction":
                raise ConfigurationError(
                    f"{where} has maxmemory-policy {policy!r}: when full it would evict keys, and with "
                    "them sagas, their outboxes and timers, silently. Set 'maxmemory-policy noeviction' "
                    "(a full Redis then refuses writes, and the orchestrator waits and retries until "
                    "memory frees)"
                )

    async def close(self) -> None:
        """Release the connections of a client this store made (a client passed in stays open);
        idempotent. The store cannot be used afterwards.

        Raises:
            StateStoreError: closing the client failed.
        """
        if self._closed:
            return
        await self._held.flush()  # errors go to the acknowledgements' callers, who log them
        self._closed = True
        if self._owned or self._replicas is not None:
            try:
                if self._replicas is not None:
                    await self._replicas.aclose()
                if self._owned:
                    await close_client(self._client)
            except FAILURES as exc:
                raise StateStoreError(f"Redis state store: close failed: {exc}") from exc
