"""The Redis key layout of the state store, in one place: :class:`RedisKeys`.

The Lua script builds the same names with definitions generated from this module
(:func:`lua_definitions`), so neither side spells a key out on its own.
"""

from __future__ import annotations

from typing import Final

from ...constants import DEFAULT_KEY_PREFIX
from ...errors import ValidationError

__all__ = ["PYTHON_ONLY", "RedisKeys", "lua_definitions"]

# The pieces every name is made of. Every key but the partition count is a partition's: its name
# starts with the prefix and the partition in braces (the hash tag, all Redis Cluster hashes), so every
# key one script call touches, a partition's, lands in one slot. A per-saga key then names its kind
# before the transaction id, so no id can make one kind's name another's.
_TAG_OPEN: Final = ":{p"
_TAG_CLOSE: Final = "}"
_SAGA: Final = ":s:"
_EVENTS: Final = ":ev:"
_OUTBOX: Final = ":o:"
_SAGA_TIMERS: Final = ":t:"
# One index per (state, workflow): the state goes first, since it never holds a colon and a workflow id may.
_INDEX: Final = ":idx:"
_WORKFLOWS: Final = ":workflows"
_OUTBOXES: Final = ":outboxes"
_TIMERS: Final = ":timers"
_TIMER_ENTRIES: Final = ":timer"
_PARTITIONS: Final = ":partitions"
_BARRIER: Final = ":barrier"


class RedisKeys:
    """The name of every key of the Redis state store under one prefix (P below, n a partition, tx a
    transaction id, in partition n: see :func:`~.partitions.partition_of`)::

        partitions          P:partitions            str   the partition count, recorded at first start
        saga(n, tx)         P:{pn}:s:<tx>           str   the saga's record: version, state, workflow,
                                                          its recent events' digests, then its JSON
        events(n, tx)       P:{pn}:ev:<tx>          set   a deleted saga's recent events' digests, kept
                                                          dedupe_ttl
        outbox(n, tx)       P:{pn}:o:<tx>           zset  score = outbox id (the version that wrote
                                                          it), member = an encoded outbox entry
        saga_timers(n, tx)  P:{pn}:t:<tx>           set   ids of the saga's live timers
        outboxes(n)         P:{pn}:outboxes         set   tx ids whose outbox may not be empty (the
                                                          sweep takes out those whose outbox is)
        timers(n)           P:{pn}:timers           zset  score = due time (epoch seconds), member =
                                                          timer id
        timer_entries(n)    P:{pn}:timer            hash  timer id -> an encoded Timer (packing.py)
        index(n, st, wf)    P:{pn}:idx:<st>:<wf>    zset  tx ids of the sagas of workflow wf in state
                                                          st, score = when the saga entered st (its
                                                          updated_at, epoch ms)
        workflows(n)        P:{pn}:workflows        set   every workflow id that has had a saga here
        barrier(n)          P:{pn}:barrier          str   "1", written before a WAIT that must cover
                                                          an earlier write (replication.py)

    A saga's partition is its Kafka partition (murmur2 of its id modulo the partition count), so one
    partition's batch touches one Redis Cluster slot, and one script call writes it. A saga's own keys
    expire ``retention`` (``failed_retention`` if it failed) after it ends; the indexes of the final
    states are trimmed by score (:meth:`RedisStateStore.trim`). One index per (state, workflow) keeps
    one member per saga, and lets a listing page read only the indexes that match its filter, ``limit``
    members each.

    Raises:
        ValidationError: ``prefix`` is empty or holds a brace (it would move the hash tag off the
            partition).
    """

    __slots__ = ("prefix",)

    def __init__(self, prefix: str = DEFAULT_KEY_PREFIX) -> None:
        if not prefix or "{" in prefix or "}" in prefix:
            raise ValidationError(f"key_prefix must be non-empty and without braces, not {prefix!r}")
        self.prefix: Final = prefix

    def __repr__(self) -> str:
        return f"RedisKeys({self.prefix!r})"

    @property
    def partitions(self) -> str:
        return self.prefix + _PARTITIONS

    def tagged(self, partition: int) -> str:
        """The prefix of partition ``partition``'s keys, hash tag included: what the script calls P."""
        return f"{self.prefix}{_TAG_OPEN}{int(partition)}{_TAG_CLOSE}"

    def saga(self, partition: int, transaction_id: str) -> str:
        return self.tagged(partition) + _SAGA + transaction_id

    def events(self, partition: int, transaction_id: str) -> str:
        return self.tagged(partition) + _EVENTS + transaction_id

    def outbox(self, partition: int, transaction_id: str) -> str:
        return self.tagged(partition) + _OUTBOX + transaction_id

    def saga_timers(self, partition: int, transaction_id: str) -> str:
        return self.tagged(partition) + _SAGA_TIMERS + transaction_id

    def outboxes(self, partition: int) -> str:
        return self.tagged(partition) + _OUTBOXES

    def timers(self, partition: int) -> str:
        return self.tagged(partition) + _TIMERS

    def timer_entries(self, partition: int) -> str:
        return self.tagged(partition) + _TIMER_ENTRIES

    def workflows(self, partition: int) -> str:
        return self.tagged(partition) + _WORKFLOWS

    def index(self, partition: int, state: str, workflow_id: str) -> str:
        return f"{self.tagged(partition)}{_INDEX}{state!s}:{workflow_id}"

    def barrier(self, partition: int) -> str:
        return self.tagged(partition) + _BARRIER


# Built by Python alone: the script never reads the partition count or the barrier, or makes a
# partition's prefix.
PYTHON_ONLY: Final = frozenset({"barrier", "partitions", "tagged"})


def _lua(text: str) -> str:
    """``text`` as a Lua string literal (the pieces above need no escapes; this checks they get none)."""
    if "'" in text or "\\" in text or not text.isprintable():
        raise ValueError(f"not a plain Lua string: {text!r}")
    return f"'{text}'"


def lua_definitions(prefix_expression: str) -> str:
    """Lua source that defines ``K``, with a function or a string per :class:`RedisKeys` name but
    :data:`PYTHON_ONLY`, for a script whose partition's prefix (:meth:`RedisKeys.tagged`) is
    ``prefix_expression``."""

    def of_saga(name: str, kind: str) -> str:
        return f"function K.{name}(tx) return P .. {_lua(kind)} .. tx end"

    return "\n".join(
        (
            f"local P = {prefix_expression}",
            "local K = {",
            f"  outboxes = P .. {_lua(_OUTBOXES)},",
            f"  timers = P .. {_lua(_TIMERS)},",
            f"  timer_entries = P .. {_lua(_TIMER_ENTRIES)},",
            f"  workflows = P .. {_lua(_WORKFLOWS)},",
            "}",
            of_saga("saga", _SAGA),
            of_saga("events", _EVENTS),
            of_saga("outbox", _OUTBOX),
            of_saga("saga_timers", _SAGA_TIMERS),
            f"function K.index(st, wf) return P .. {_lua(_INDEX)} .. st .. ':' .. wf end",
        )
    )
