"""The Redis state store: :class:`RedisStateStore`.

Every per-saga key carries the transaction id in a hash tag, so one saga's keys share a Redis Cluster
slot (P is ``key_prefix``, tx the transaction id)::

    P:{tx}          hash  v (version), ctx (SagaContext JSON), wf (workflow id), state
    P:{tx}:ev       set   processed event ids; expires ``dedupe_ttl`` after the saga's last applied event
    P:{tx}:outbox   zset  score = outbox id (the version that wrote it), member = encoded messages
    P:{tx}:timers   set   ids of the saga's live timers (so delete_context can find them)
    P:outboxes      set   tx ids whose outbox is not empty
    P:timers        zset  score = due time (epoch seconds), member = timer id
    P:timer         hash  timer id -> encoded Timer
    P:idx:all, P:idx:wf:<workflow id>, P:idx:state:<state>   sets of tx ids, for list_contexts

Every write goes through one Lua script (``redis_scripts.lua``), called with EVALSHA and loaded on
NOSCRIPT. :meth:`RedisStateStore.apply` applies a whole batch of transitions in one script call, each
still checked and applied on its own: one call per batch, not one per event, is what keeps the client's
CPU per transition in the tens of microseconds (DESIGN section 7). A batch travels as two arguments: a
small JSON document (orjson in, Lua ``cjson`` out) with each write's ids, versions and the lengths of its
large values, and those values (saga JSON, outbox and timer entries) raw and back to back, so neither side
escapes or unescapes them. An outbox entry keeps its messages' bytes raw too (see _dump_outbox).

The index and timer keys are global and the scripts build keys from the arguments, so the store targets
a single Redis server (or a primary with replicas), **not Redis Cluster**.

A script runs atomically: no other client sees half of it, and a Redis that dies during a call has
applied all of the call or none of it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any, Final, cast

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.client import NEVER_DECODE
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from ..constants import DEDUPE_TTL_SECONDS, DEFAULT_KEY_PREFIX, DEFAULT_REDIS_URL, ENV_REDIS_URL
from ..context import SagaContext, storable
from ..errors import StateStoreError, ValidationError
from ..ports import (
    ApplyResult,
    ApplyStatus,
    IStateStore,
    OutboxMessage,
    PendingOutbox,
    Timer,
    TransitionWrite,
)

__all__ = ["RedisStateStore"]

_SCRIPT: Final[str] = (
    resources.files("orchestrator_kafka.backends").joinpath("redis_scripts.lua").read_text("utf-8")
)
_SHA: Final[str] = hashlib.sha1(_SCRIPT.encode("utf-8"), usedforsecurity=False).hexdigest()

# The script's status codes, by index.
_STATUS: Final[tuple[ApplyStatus, ...]] = ("applied", "applied", "duplicate", "conflict", "unchanged")

_Messages = tuple[OutboxMessage, ...]


# ---------------------------------------------------------------- encodings
#
# An outbox entry is a small JSON head, a newline, then the messages' values back to back, raw:
#     [outbox_id, [topic, key, value_length, [[header, value], ...]], ...] \n value value ...
# The outbox id makes every entry unique in the outbox's sorted set even when two transitions publish
# the same messages. The values (message JSON, usually) go raw so nothing escapes them; header values are
# short and go as latin-1 strings, a bijection between bytes and the code points 0-255. orjson never
# writes a raw newline, so the first one ends the head. An entry without one is the older all-JSON form
# (values as latin-1 strings too), still read so that an upgrade finds its outboxes.


def _dump_outbox(outbox_id: int, messages: _Messages) -> bytes:
    head: list[Any] = [outbox_id]
    for m in messages:
        headers = m.headers
        head.append(
            (m.topic, m.key, len(m.value), [(k, v.decode("latin-1")) for k, v in headers] if headers else ())
        )
    return b"".join((orjson.dumps(head), b"\n", *(m.value for m in messages)))


def _load_outbox(entry: bytes) -> _Messages:
    raw_head, newline, values = entry.partition(b"\n")
    if not newline:  # the older all-JSON form
        _, *old = orjson.loads(entry)
        return tuple(
            OutboxMessage(topic, key, value.encode("latin-1"), tuple((k, v.encode("latin-1")) for k, v in hs))
            for topic, key, value, hs in old
        )
    _, *heads = orjson.loads(raw_head)
    messages: list[OutboxMessage] = []
    at = 0
    for topic, key, length, headers in heads:
        value = values[at : at + length]
        at += length
        messages.append(OutboxMessage(topic, key, value, tuple((k, v.encode("latin-1")) for k, v in headers)))
    if at != len(values):
        raise ValueError(f"an outbox entry's values take {len(values)} bytes, its head says {at}")
    return tuple(messages)


def _dump_timer(t: Timer) -> bytes:
    return orjson.dumps(
        (t.timer_id, t.transaction_id, t.due_at, t.kind, t.step, t.phase, t.attempt, t.command_id)
    )


def _load_timer(entry: bytes) -> Timer:
    timer_id, tx, due_at, kind, step, phase, attempt, command_id = orjson.loads(entry)
    return Timer(timer_id, tx, float(due_at), kind, step, phase, attempt, command_id)


def _text(value: bytes | str) -> str:
    # A client passed in may decode replies itself (decode_responses=True): every stored value is UTF-8.
    return value if isinstance(value, str) else value.decode()


def _messages_of(entries: Sequence[bytes], cache: dict[bytes, _Messages]) -> _Messages:
    # Several duplicates of one saga in a batch bring back the same entries: decode each once.
    messages: list[OutboxMessage] = []
    for entry in entries:
        found = cache.get(entry)
        if found is None:
            found = cache[entry] = _load_outbox(entry)
        messages.extend(found)
    return tuple(messages)


def _pack(writes: Sequence[TransitionWrite]) -> tuple[bytes, bytes]:
    """The script's two arguments for ``writes``: the JSON document and the raw values."""
    packed: list[tuple[Any, ...]] = []
    append = packed.append
    # The large values (saga JSON, outbox and timer entries) go raw, back to back, in one argument;
    # the JSON document holds their lengths (see the script's comment on ARGV[5]).
    data: list[bytes] = []
    put = data.append
    for w in writes:
        saga = w.saga
        if saga is None:
            append((w.event_id, w.transaction_id, w.expected_version, 0, 0, "", "", 0, (), w.cancel_timers))
            continue
        version = w.expected_version + 1
        if saga.version != version or saga.transaction_id != w.transaction_id:
            raise ValidationError(
                f"the write of event {w.event_id!r} for {w.transaction_id!r} carries saga "
                f"{saga.transaction_id!r} at version {saga.version}, not at {version}"
            )
        ctx = saga.to_json()
        put(ctx)
        entry_len = 0
        if w.outbox:
            entry = _dump_outbox(version, w.outbox)
            put(entry)
            entry_len = len(entry)
        timers: list[tuple[str, float, int]] | tuple[()] = ()
        if w.timers:
            timers = []
            for t in w.timers:
                timer_entry = _dump_timer(t)
                put(timer_entry)
                timers.append((t.timer_id, t.due_at, len(timer_entry)))
        append(
            (
                w.event_id,
                w.transaction_id,
                w.expected_version,
                version,
                len(ctx),
                saga.workflow_id,
                saga.state,  # orjson writes a str Enum as its value
                entry_len,
                timers,
                w.cancel_timers,
            )
        )
    return orjson.dumps(packed), b"".join(data)


def _corrupt(op: str, exc: Exception) -> StateStoreError:
    return StateStoreError(f"Redis state store: {op}: a stored entry or the reply cannot be decoded: {exc}")


class RedisStateStore(IStateStore):
    """A state store in Redis: versioned atomic transitions, event dedupe, outboxes, timers, indexes.

    ``url`` defaults to the ``REDIS_URL`` environment variable, else ``redis://localhost:6379/0``; pass
    ``client`` to use a client of your own (then :meth:`close` leaves it open). Processed event ids are
    remembered for ``dedupe_ttl`` seconds after the saga's last applied event. A store of its own making
    fails fast on a dead Redis (5 s to connect, 10 s per reply) and retries a dropped connection once.

    Every method raises :class:`~orchestrator_kafka.errors.StateStoreError` when Redis fails or cannot
    be reached, or returns what cannot be decoded; a failed write has written nothing (:meth:`apply`
    says the one exception). The store targets one Redis server or primary, not Redis Cluster (see the
    module docstring).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        client: aioredis.Redis | None = None,
        dedupe_ttl: int = DEDUPE_TTL_SECONDS,
    ) -> None:
        if dedupe_ttl <= 0:
            raise ValidationError(f"dedupe_ttl must be a positive number of seconds, not {dedupe_ttl!r}")
        if not key_prefix or "{" in key_prefix or "}" in key_prefix:
            # A brace in the prefix would move the keys' hash tag off the transaction id.
            raise ValidationError(f"key_prefix must be non-empty and without braces, not {key_prefix!r}")
        self._prefix = key_prefix
        self._ttl = str(int(dedupe_ttl))
        self._owned = client is None
        self._closed = False
        if client is None:
            client = aioredis.Redis.from_url(
                url or os.environ.get(ENV_REDIS_URL) or DEFAULT_REDIS_URL,
                socket_connect_timeout=5.0,
                socket_timeout=10.0,
                health_check_interval=30,
                # One retry on a dropped connection only: a timeout is not retried (a dead Redis must
                # fail fast). Re-sending a script whose reply was lost is safe: its applied writes come
                # back as duplicates (their event ids are recorded), acks are idempotent, and timers a
                # lost claim leased fire again when the lease ends.
                retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 1, (RedisConnectionError,)),
            )
        self._client: aioredis.Redis = client
        # redis-py leaves execute_command untyped; every reply here is decoded by its caller.
        self._execute = cast("Callable[..., Awaitable[Any]]", client.execute_command)

    @property
    def key_prefix(self) -> str:
        """The prefix of every key this store uses."""
        return self._prefix

    # ------------------------------------------------------------ plumbing

    def _base(self, transaction_id: str) -> str:
        return f"{self._prefix}:{{{transaction_id}}}"

    def _check_open(self) -> None:
        if self._closed:
            raise StateStoreError("the Redis state store is closed")

    async def _script(self, op: str, *args: str | bytes | int) -> Any:
        """Run ``op`` of the store's script: EVALSHA, loading the script on NOSCRIPT."""
        self._check_open()
        execute = self._execute
        # Replies stay bytes even for a client that decodes responses: outbox entries hold raw bytes.
        raw = {NEVER_DECODE: True}
        try:
            try:
                return await execute("EVALSHA", _SHA, 0, op, self._prefix, *args, **raw)
            except NoScriptError:
                # First use on this server, or after SCRIPT FLUSH / a restart: NOSCRIPT means nothing ran.
                await execute("SCRIPT", "LOAD", _SCRIPT)
                return await execute("EVALSHA", _SHA, 0, op, self._prefix, *args, **raw)
        except (RedisError, OSError) as exc:
            raise StateStoreError(f"Redis state store: {op} failed: {type(exc).__name__}: {exc}") from exc

    async def _command(self, *args: str | bytes | int) -> Any:
        self._check_open()
        try:
            return await self._execute(*args)
        except (RedisError, OSError) as exc:
            raise StateStoreError(
                f"Redis state store: {args[0]!s} failed: {type(exc).__name__}: {exc}"
            ) from exc

    @staticmethod
    def _parse(transaction_id: str, raw: bytes) -> SagaContext:
        try:
            return SagaContext.from_json(raw)
        except ValidationError as exc:
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
        """
        raw = storable(context)
        await self._script(
            "save",
            context.transaction_id,
            context.version,
            raw,
            context.workflow_id,
            str(context.state),
        )

    async def load_context(self, transaction_id: str) -> SagaContext | None:
        """The saga ``transaction_id``, or None if it does not exist.

        Raises:
            StateStoreError: Redis failed, or the stored record is not a valid saga.
        """
        raw = await self._command("HGET", self._base(transaction_id), "ctx")
        return None if raw is None else self._parse(transaction_id, raw)

    async def load_contexts(self, transaction_ids: Sequence[str]) -> dict[str, SagaContext]:
        """The sagas that exist among ``transaction_ids``, in one round trip.

        Raises:
            StateStoreError: Redis failed, or a stored record is not a valid saga.
        """
        if not transaction_ids:
            return {}
        ids = list(transaction_ids)
        raws = await self._script("load", orjson.dumps(ids))
        return {tx: self._parse(tx, raw) for tx, raw in zip(ids, raws, strict=True) if raw is not None}

    async def delete_context(self, transaction_id: str) -> bool:
        """Delete the saga, its outbox, its timers and its index entries; True if the saga existed.

        Its processed event ids are kept until they expire, so a late redelivery is still a duplicate.

        Raises:
            StateStoreError: Redis failed; nothing was deleted.
        """
        return bool(await self._script("delete", transaction_id))

    async def list_contexts(self, workflow_id: str | None = None, state: str | None = None) -> list[str]:
        """Transaction ids of the sagas of ``workflow_id`` in ``state`` (None matches any), sorted.

        Raises:
            StateStoreError: Redis failed.
        """
        p = self._prefix
        if workflow_id is None and state is None:
            found = await self._command("SMEMBERS", f"{p}:idx:all")
        elif state is None:
            found = await self._command("SMEMBERS", f"{p}:idx:wf:{workflow_id}")
        elif workflow_id is None:
            found = await self._command("SMEMBERS", f"{p}:idx:state:{state!s}")
        else:
            found = await self._command("SINTER", f"{p}:idx:wf:{workflow_id}", f"{p}:idx:state:{state!s}")
        return sorted(_text(member) for member in found)

    # ------------------------------------------------------------ transitions

    async def apply(self, writes: Sequence[TransitionWrite]) -> list[ApplyResult]:
        """Apply each write atomically and in order, all in one script call; one result per write.

        Per write: an event id processed before gives ``duplicate`` with the saga's current outbox; a
        stored version other than ``expected_version`` (0: the saga must not exist) gives ``conflict``, as
        does every later write of a transaction that conflicted earlier in the batch; a write without a
        saga gives ``unchanged`` after cancelling its ``cancel_timers``; otherwise the saga, indexes,
        outbox entry (id = the new version), timers, cancellations and event id are written and the
        result is ``applied`` with the write's own messages (older unacknowledged entries are left to
        their writer and to the recovery sweep).

        Raises:
            ValidationError: a write's saga is not its transaction's or not at ``expected_version + 1``
                (checked before anything is sent, so nothing is written).
            StateStoreError: Redis failed. A lost connection or a Redis out of memory leaves the batch
                written entirely or not at all (the script is atomic, and Redis refuses a script's
                first write, not a later one, when memory is full). Only a script error half way (a
                key of the wrong type written by someone else) keeps the writes before it, which is
                safe: redelivered, they come back as duplicates.
        """
        if not writes:
            return []
        try:
            batch, data = _pack(writes)
        except orjson.JSONEncodeError as exc:
            raise ValidationError(f"a write cannot be encoded: {exc}") from exc
        replies = await self._script("apply", self._ttl, batch, data)
        if len(replies) != len(writes):
            raise StateStoreError(f"Redis state store: {len(replies)} results for {len(writes)} writes")
        cache: dict[bytes, _Messages] = {}
        results: list[ApplyResult] = []
        try:
            for w, reply in zip(writes, replies, strict=True):
                status = _STATUS[reply[0]]
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
                    messages = _messages_of(reply[2:], cache)
                    results.append(ApplyResult(status, w.transaction_id, reply[1], messages))
        except (ValueError, TypeError, IndexError) as exc:
            raise _corrupt("apply", exc) from exc
        return results

    # ------------------------------------------------------------ outboxes

    async def ack_outbox(self, acks: Sequence[tuple[str, int]]) -> None:
        """Forget each saga's outbox entries up to ``outbox_id``, in one script call.

        Raises:
            StateStoreError: Redis failed; nothing was acknowledged.
        """
        if acks:
            await self._script("ack", orjson.dumps([[tx, int(outbox_id)] for tx, outbox_id in acks]))

    async def pending_outboxes(self, limit: int = 1000) -> list[PendingOutbox]:
        """Up to ``limit`` sagas whose outbox is not empty, each with all its messages, oldest first.

        Raises:
            StateStoreError: Redis failed.
        """
        if limit <= 0:
            return []
        replies = await self._script("pending", int(limit))
        cache: dict[bytes, _Messages] = {}
        try:
            return [
                PendingOutbox(_text(reply[0]), int(reply[1]), _messages_of(reply[2:], cache))
                for reply in replies
            ]
        except (ValueError, TypeError) as exc:
            raise _corrupt("pending_outboxes", exc) from exc

    # ------------------------------------------------------------ timers

    async def claim_due_timers(self, now: float, limit: int, lease: float) -> list[Timer]:
        """Claim up to ``limit`` timers due by ``now``, earliest first.

        Each claimed timer is rescheduled to ``now + lease``: hidden from other claims until then, and
        due again if whoever claimed it dies. Only a write's ``cancel_timers`` deletes it.

        Raises:
            StateStoreError: Redis failed; nothing was claimed.
        """
        if limit <= 0:
            return []
        entries = await self._script("claim", repr(float(now)), int(limit), repr(float(now) + float(lease)))
        try:
            return [_load_timer(entry) for entry in entries]
        except (ValueError, TypeError) as exc:
            raise _corrupt("claim_due_timers", exc) from exc

    # ------------------------------------------------------------ lifecycle

    async def close(self) -> None:
        """Release the connections of a client this store made (a client passed in stays open);
        idempotent. The store cannot be used afterwards.

        Raises:
            StateStoreError: closing the client failed.
        """
        if self._closed:
            return
        self._closed = True
        if self._owned:
            try:
                await self._client.aclose()
            except (RedisError, OSError) as exc:
                raise StateStoreError(f"Redis state store: close failed: {exc}") from exc
