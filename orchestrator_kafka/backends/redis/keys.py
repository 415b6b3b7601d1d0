"""The Redis key layout of the state store, in one place: :class:`RedisKeys` and :class:`SagaField`.

The Lua script builds the same names with definitions generated from this module
(:func:`lua_definitions`), so neither side spells a key out on its own.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

from ...constants import DEFAULT_KEY_PREFIX
from ...errors import ValidationError

__all__ = ["RedisKeys", "SagaField", "lua_definitions"]

# The pieces every name is made of, after the prefix. A per-saga key puts the transaction id in braces:
# Redis Cluster hashes only what is inside them, so every key of one saga lands in one slot.
_TAG_OPEN: Final = ":{"
_TAG_CLOSE: Final = "}"
_EVENTS: Final = ":ev"
_OUTBOX: Final = ":outbox"
_SAGA_TIMERS: Final = ":timers"
_ALL_SAGAS: Final = ":idx:all"
_BY_WORKFLOW: Final = ":idx:wf:"
_BY_STATE: Final = ":idx:state:"
_OUTBOXES: Final = ":outboxes"
_TIMERS: Final = ":timers"
_TIMER_ENTRIES: Final = ":timer"


class SagaField(StrEnum):
    """The fields of a saga's hash, :meth:`RedisKeys.saga`."""

    VERSION = "v"
    CONTEXT = "ctx"  # the SagaContext JSON
    WORKFLOW = "wf"
    STATE = "state"


class RedisKeys:
    """The name of every key of the Redis state store under one prefix (P below, tx a transaction id)::

        saga(tx)        P:{tx}            hash  SagaField: v (version), ctx (SagaContext JSON), wf, state
        events(tx)      P:{tx}:ev         set   processed event ids; expires dedupe_ttl after the saga's
                                                last applied event
        outbox(tx)      P:{tx}:outbox     zset  score = outbox id (the version that wrote it),
                                                member = an encoded outbox entry (see packing.py)
        saga_timers(tx) P:{tx}:timers     set   ids of the saga's live timers (so a delete finds them)
        outboxes        P:outboxes        set   tx ids whose outbox is not empty
        timers          P:timers          zset  score = due time (epoch seconds), member = timer id
        timer_entries   P:timer           hash  timer id -> an encoded Timer (see packing.py)
        all_sagas       P:idx:all         set   tx ids of every saga
        by_workflow(wf) P:idx:wf:<wf>     set   tx ids of the sagas of workflow wf
        by_state(st)    P:idx:state:<st>  set   tx ids of the sagas in state st

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
    def all_sagas(self) -> str:
        return self.prefix + _ALL_SAGAS

    def by_workflow(self, workflow_id: str) -> str:
        return f"{self.prefix}{_BY_WORKFLOW}{workflow_id}"

    def by_state(self, state: str) -> str:
        return f"{self.prefix}{_BY_STATE}{state!s}"


def _lua(text: str) -> str:
    """``text`` as a Lua string literal (the pieces above need no escapes; this checks they get none)."""
    if "'" in text or "\\" in text or not text.isprintable():
        raise ValueError(f"not a plain Lua string: {text!r}")
    return f"'{text}'"


def lua_definitions(prefix_expression: str) -> str:
    """Lua source that defines ``K``, with a function or a string per :class:`RedisKeys` name, and
    ``H``, the :class:`SagaField` names, for a script whose key prefix is ``prefix_expression``."""

    def of_saga(name: str, suffix: str) -> str:
        tail = _lua(_TAG_CLOSE + suffix)
        return f"function K.{name}(tx) return P .. {_lua(_TAG_OPEN)} .. tx .. {tail} end"

    fields = ", ".join(f"{f.name} = {_lua(f.value)}" for f in SagaField)
    return "\n".join(
        (
            f"local P = {prefix_expression}",
            "local K = {",
            f"  outboxes = P .. {_lua(_OUTBOXES)},",
            f"  timers = P .. {_lua(_TIMERS)},",
            f"  timer_entries = P .. {_lua(_TIMER_ENTRIES)},",
            f"  all_sagas = P .. {_lua(_ALL_SAGAS)},",
            "}",
            of_saga("saga", ""),
            of_saga("events", _EVENTS),
            of_saga("outbox", _OUTBOX),
            of_saga("saga_timers", _SAGA_TIMERS),
            f"function K.by_workflow(wf) return P .. {_lua(_BY_WORKFLOW)} .. wf end",
            f"function K.by_state(st) return P .. {_lua(_BY_STATE)} .. st end",
            f"local H = {{{fields}}}",
        )
    )
