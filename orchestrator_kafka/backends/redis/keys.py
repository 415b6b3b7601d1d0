"""The Redis key layout of the state store, in one place: :class:`RedisKeys`.

The Lua script builds the same names with definitions generated from this module
(:func:`lua_definitions`), so neither side spells a key out on its own.
"""

from __future__ import annotations

from typing import Final

from ...constants import DEFAULT_KEY_PREFIX
from ...errors import ValidationError

__all__ = ["RedisKeys", "lua_definitions"]

# The pieces every name is made of, after the prefix. A per-saga key puts the transaction id in braces:
# Redis Cluster hashes only what is inside them, so every key of one saga lands in one slot.
_TAG_OPEN: Final = ":{"
_TAG_CLOSE: Final = "}"
_EVENTS: Final = ":ev"
_OUTBOX: Final = ":outbox"
_SAGA_TIMERS: Final = ":timers"
# One index per (state, workflow): the state goes first, since it never holds a colon and a workflow id may.
_INDEX: Final = ":idx:"
_WORKFLOWS: Final = ":idx:workflows"
_OUTBOXES: Final = ":outboxes"
_TIMERS: Final = ":timers"
_TIMER_ENTRIES: Final = ":timer"


class RedisKeys:
    """The name of every key of the Redis state store under one prefix (P below, tx a transaction id)::

        saga(tx)        P:{tx}            str   the saga's record: version, state, workflow, its recent
                                                events' digests, then its JSON (packing.py)
        events(tx)      P:{tx}:ev         set   a deleted saga's recent events' digests, kept dedupe_ttl
        outbox(tx)      P:{tx}:outbox     zset  score = outbox id (the version that wrote it),
                                                member = an encoded outbox entry (see packing.py)
        saga_timers(tx) P:{tx}:timers     set   ids of the saga's live timers (so a delete finds them)
        outboxes        P:outboxes        set   tx ids whose outbox is not empty
        timers          P:timers          zset  score = due time (epoch seconds), member = timer id
        timer_entries   P:timer           hash  timer id -> an encoded Timer (see packing.py)
        index(st, wf)   P:idx:<st>:<wf>   zset  tx ids of the sagas of workflow wf in state st, score =
                                                when the saga entered st (its updated_at, epoch ms)
        workflows       P:idx:workflows   set   every workflow id that has had a saga (to find indexes)

    A saga's own keys expire ``retention`` (``failed_retention`` if it failed) after it ends; the
    indexes of the final states are trimmed by score (:meth:`RedisStateStore.trim`). One index per
    (state, workflow) keeps one member per saga, and lets a listing page read only the indexes that
    match its filter, ``limit`` members each.

    The index and timer keys are global, so the layout targets one Redis server (or a primary with
    replicas), not Redis Cluster.

    Raises:
        ValidationError: ``prefix`` is empty or holds a brace (it would move the hash tag off the
            transaction id).
    """

    __slots__ = ("prefix",)

    def __init__(self, prefix: str = DEFAULT_KEY_PREFIX) -> None:
        if not prefix or "{" in prefix or "}" in prefix:
            raise ValidationError(f"key_prefix must be non-empty and without braces, not {prefix!r}")
        self.prefix: Final = prefix

    def __repr__(self) -> str:
        return f"RedisKeys({self.prefix!r})"

    def _of_saga(self, transaction_id: str, suffix: str) -> str:
        return f"{self.prefix}{_TAG_OPEN}{transaction_id}{_TAG_CLOSE}{suffix}"

    def saga(self, transaction_id: str) -> str:
        return self._of_saga(transaction_id, "")

    def events(self, transaction_id: str) -> str:
        return self._of_saga(transaction_id, _EVENTS)

    def outbox(self, transaction_id: str) -> str:
        return self._of_saga(transaction_id, _OUTBOX)

    def saga_timers(self, transaction_id: str) -> str:
        return self._of_saga(transaction_id, _SAGA_TIMERS)

    @property
    def outboxes(self) -> str:
        return self.prefix + _OUTBOXES

    @property
    def timers(self) -> str:
        return self.prefix + _TIMERS

    @property
    def timer_entries(self) -> str:
        return self.prefix + _TIMER_ENTRIES

    @property
    def workflows(self) -> str:
        return self.prefix + _WORKFLOWS

    def index(self, state: str, workflow_id: str) -> str:
        return f"{self.prefix}{_INDEX}{state!s}:{workflow_id}"


def _lua(text: str) -> str:
    """``text`` as a Lua string literal (the pieces above need no escapes; this checks they get none)."""
    if "'" in text or "\\" in text or not text.isprintable():
        raise ValueError(f"not a plain Lua string: {text!r}")
    return f"'{text}'"


def lua_definitions(prefix_expression: str) -> str:
    """Lua source that defines ``K``, with a function or a string per :class:`RedisKeys` name, for a
    script whose key prefix is ``prefix_expression``."""

    def of_saga(name: str, suffix: str) -> str:
        tail = _lua(_TAG_CLOSE + suffix)
        return f"function K.{name}(tx) return P .. {_lua(_TAG_OPEN)} .. tx .. {tail} end"

    return "\n".join(
        (
            f"local P = {prefix_expression}",
            "local K = {",
            f"  outboxes = P .. {_lua(_OUTBOXES)},",
            f"  timers = P .. {_lua(_TIMERS)},",
            f"  timer_entries = P .. {_lua(_TIMER_ENTRIES)},",
            f"  workflows = P .. {_lua(_WORKFLOWS)},",
            "}",
            of_saga("saga", ""),
            of_saga("events", _EVENTS),
            of_saga("outbox", _OUTBOX),
            of_saga("saga_timers", _SAGA_TIMERS),
            f"function K.index(st, wf) return P .. {_lua(_INDEX)} .. st .. ':' .. wf end",
        )
    )
