"""What the Redis state store sends its script and stores: the packed batch of writes, outbox entries
and timer entries, with the field positions both sides read them by (:class:`WriteField`,
:class:`TimerField`, :class:`Outcome`), defined here once and handed to Lua by :func:`lua_definitions`.

A batch travels as two arguments: a small JSON document (orjson in, Lua ``cjson`` out), a list with one
row per write holding its ids, versions and the lengths of its large values, and those values (saga
JSON, outbox and timer entries) raw and back to back, so neither side escapes or unescapes them:
decoding them as escaped JSON strings cost cjson as much time as all of a transition's Redis commands.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import struct
from collections.abc import Callable, Sequence
from datetime import datetime
from enum import IntEnum
from typing import Any, Final

import orjson

from ...constants import EVENTS_KEPT
from ...context import SagaContext, StepRuntime, WorkflowState
from ...errors import ValidationError
from ...values import ApplyStatus, OutboxMessage, Timer, TransitionWrite
from ..writes import check_write

__all__ = [
    "ACK_FORMAT",
    "DIGEST_LEN",
    "STATUS",
    "Outcome",
    "RecordField",
    "TimerField",
    "WriteField",
    "compact_json",
    "dump_outbox",
    "dump_timer",
    "epoch_ms",
    "event_digest",
    "load_outbox",
    "load_record",
    "load_timer",
    "lua_definitions",
    "messages_of",
    "pack",
    "pack_acks",
    "retention_kind",
    "saga_json",
]

Messages = tuple[OutboxMessage, ...]


class WriteField(IntEnum):
    """The position (1-based, as Lua counts) of each field in a write's row of the packed batch."""

    EVENT_DIGEST = 1  # event_digest() of the event id
    TX = 2
    EXPECTED_VERSION = 3
    NEW_VERSION = 4  # 0: the write has no saga
    CONTEXT_LEN = 5  # the saga JSON's length in the raw values
    WORKFLOW = 6
    STATE = 7
    OUTBOX_LEN = 8  # the outbox entry's length in the raw values; 0: no entry
    TIMERS = 9  # one row per timer, by TimerField
    CANCEL_TIMERS = 10  # timer ids
    UPDATED_MS = 11  # the saga's updated_at, epoch milliseconds: its index score if its state changes


class RecordField(IntEnum):
    """The position of each field in a saga's record, before the saga's JSON (see :func:`load_record`)."""

    VERSION = 1
    STATE = 2
    WORKFLOW = 3
    EVENTS = 4  # the event_digest() of its last EVENTS_KEPT applied events, oldest first, back to back


# What ends a record field's length: a field is <length><RECORD_SEP><bytes>.
RECORD_SEP: Final = b":"
# The length of the digest a saga's record keeps of each of its last EVENTS_KEPT events (constants.py).
DIGEST_LEN: Final = 12


class TimerField(IntEnum):
    """The position of each field in a timer's row, :attr:`WriteField.TIMERS`."""

    ID = 1
    DUE_AT = 2
    ENTRY_LEN = 3  # the timer entry's length in the raw values


class Outcome(IntEnum):
    """The status code that starts the script's reply for each write."""

    APPLIED = 1
    DUPLICATE = 2
    CONFLICT = 3
    UNCHANGED = 4


STATUS: Final[dict[int, ApplyStatus]] = {
    Outcome.APPLIED: "applied",
    Outcome.DUPLICATE: "duplicate",
    Outcome.CONFLICT: "conflict",
    Outcome.UNCHANGED: "unchanged",
}


def retention_kind(state: WorkflowState) -> int | None:
    """Which retention a saga in ``state`` keeps: 1 the retention of an ended saga, 2 a failed one's,
    None (unfinished) none, it never expires."""
    if not state.is_final:
        return None
    return 2 if state is WorkflowState.FAILED else 1


def lua_definitions() -> str:
    """Lua source that defines ``W``, ``T``, ``R`` and ``RF``: the names of :class:`WriteField`,
    :class:`TimerField`, :class:`Outcome` and :class:`RecordField` with their numbers;
    ``RECORD_FIELDS``, ``EVENTS_KEPT``, ``DIGEST_LEN`` and ``SEP`` (:data:`RECORD_SEP`);
    ``ACK_FORMAT`` (:data:`ACK_FORMAT`); and ``FINAL``, each ended state's :func:`retention_kind`."""
    enums = "\n".join(
        f"local {name} = {{{', '.join(f'{m.name} = {m.value}' for m in enum)}}}"
        for name, enum in (("W", WriteField), ("T", TimerField), ("R", Outcome), ("RF", RecordField))
    )
    enums += (
        f"\nlocal RECORD_FIELDS = {len(RecordField)}\nlocal EVENTS_KEPT = {EVENTS_KEPT}"
        f"\nlocal DIGEST_LEN = {DIGEST_LEN}\nlocal SEP = '{RECORD_SEP.decode()}'"
        f"\nlocal ACK_FORMAT = '{ACK_FORMAT}'"
    )
    final = ", ".join(f"{s.value} = {kind}" for s in WorkflowState if (kind := retention_kind(s)) is not None)
    return f"{enums}\nlocal FINAL = {{{final}}}"


# ---------------------------------------------------------------- acknowledgements
#
# A batch of outbox acknowledgements is packed with Lua's struct library's format (struct.unpack reads it
# in C): per acknowledgement the outbox id, a double (exact to 2**53, as Lua's numbers are), then the
# transaction id's length and bytes ('c0' takes the length read just before it). Acknowledgements are
# sent once per batch: a JSON document would cost the script a cjson.decode and a table per entry.

#: The format of one acknowledgement, as Lua's struct.unpack and Python's struct (without the 'c0') read it.
ACK_FORMAT: Final = ">dHc0"
_ACK_HEAD: Final = struct.Struct(ACK_FORMAT[:-2])


def pack_acks(acks: Sequence[tuple[str, int]]) -> bytes:
    """``acks``, (transaction id, outbox id) pairs, as the script's ``ack`` operation reads them.

    Raises:
        ValidationError: an outbox id is not a whole number, or a transaction id is too long.
    """
    parts: list[bytes] = []
    head = _ACK_HEAD.pack
    try:
        for tx, outbox_id in acks:
            raw = tx.encode()
            parts += (head(int(outbox_id), len(raw)), raw)
    except (struct.error, TypeError, ValueError) as exc:
        raise ValidationError(f"an outbox acknowledgement cannot be packed: {exc}") from None
    return b"".join(parts)


# ---------------------------------------------------------------- entries
#
# An outbox entry is a small JSON head, a newline, then the messages' values back to back, raw:
#     [outbox_id, [topic, key, value_length, [[header, value], ...]], ...] \n value value ...
# The outbox id makes every entry unique in the outbox's sorted set even when two transitions publish
# the same messages. The values (message JSON, usually) go raw so nothing escapes them; header values are
# short and go as latin-1 strings, a bijection between bytes and the code points 0-255. orjson never
# writes a raw newline, so the first one ends the head.


def dump_outbox(outbox_id: int, messages: Messages) -> bytes:
    """The outbox entry of ``messages`` under ``outbox_id``."""
    head: list[Any] = [outbox_id]
    for m in messages:
        headers = m.headers
        head.append(
            (m.topic, m.key, len(m.value), [(k, v.decode("latin-1")) for k, v in headers] if headers else ())
        )
    return b"".join((orjson.dumps(head), b"\n", *(m.value for m in messages)))


def load_outbox(entry: bytes) -> Messages:
    """The messages of an outbox entry.

    Raises:
        ValueError: ``entry`` is not an outbox entry (orjson's decode error is one).
    """
    raw_head, newline, values = entry.partition(b"\n")
    if not newline:
        raise ValueError("an outbox entry without the newline that ends its head")
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


def messages_of(entries: Sequence[bytes], cache: dict[bytes, Messages]) -> Messages:
    """The messages of ``entries``, oldest first; ``cache`` keeps each entry decoded once, since several
    duplicates of one saga in a batch bring back the same entries.

    Raises:
        ValueError: an entry is not an outbox entry.
    """
    messages: list[OutboxMessage] = []
    for entry in entries:
        found = cache.get(entry)
        if found is None:
            found = cache[entry] = load_outbox(entry)
        messages.extend(found)
    return tuple(messages)


def dump_timer(t: Timer) -> bytes:
    """The stored form of a timer."""
    return orjson.dumps(
        (t.timer_id, t.transaction_id, t.due_at, t.kind, t.step, t.phase, t.attempt, t.command_id)
    )


def load_timer(entry: bytes) -> Timer:
    """The timer stored as ``entry``.

    Raises:
        ValueError, TypeError: ``entry`` is not a stored timer.
    """
    timer_id, tx, due_at, kind, step, phase, attempt, command_id = orjson.loads(entry)
    return Timer(timer_id, tx, float(due_at), kind, step, phase, attempt, command_id)


# ---------------------------------------------------------------- the saga's record


def event_digest(event_id: str) -> str:
    """What a saga's record keeps of an event id: 72 bits of its BLAKE2b hash, in base64 (DIGEST_LEN
    characters). Two of one saga's last events share one with a chance of about 2**-65."""
    raw = hashlib.blake2b(event_id.encode(), digest_size=DIGEST_LEN * 3 // 4).digest()
    return base64.b64encode(raw).decode()


def _default_dropper(
    cls: type, apart: frozenset[str] = frozenset()
) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A function from the ``__dict__`` of a ``cls`` to its fields that are neither in ``apart`` nor at
    their default. A default is comparable when it is a constant or an empty container; a field whose
    default is made otherwise (a timestamp) is always kept.

    Generated code, one test per field, as :mod:`dataclasses` makes an ``__init__``: it runs for the saga
    and each of its steps on every write, and a comprehension over the fields that looked each default up
    took twice as long (4.4 against 2.0 us for a 3-step saga).
    """
    namespace: dict[str, Any] = {}
    lines = ["def drop(d):", "    out = {}"]
    for i, f in enumerate(dataclasses.fields(cls)):
        name = f.name
        if name in apart:
            continue
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory in (list, dict):
            default = f.default_factory()
        else:
            lines.append(f"    out[{name!r}] = d[{name!r}]")
            continue
        if default is None:
            test = "v is not None"
        else:
            namespace[f"default_{i}"] = default
            test = f"v != default_{i}"
        lines += [f"    v = d[{name!r}]", f"    if {test}:", f"        out[{name!r}] = v"]
    lines.append("    return out")
    exec("\n".join(lines), namespace)  # the source is made above, from the class's own fields
    drop: Callable[[dict[str, Any]], dict[str, Any]] = namespace["drop"]
    return drop


# The fields a record holds before the saga's JSON (and its key, the transaction id): left out of the JSON.
_IN_RECORD: Final = frozenset({"transaction_id", "workflow_id", "state", "version"})
_saga_fields: Final = _default_dropper(SagaContext, _IN_RECORD)
_step_fields: Final = _default_dropper(StepRuntime)
# Stands for the transaction id inside the JSON, where command ids repeat it. orjson escapes every
# control character, so this byte never occurs in its output and the substitution reverses exactly.
_TX: Final = b"\x01"
# Stands for "<transaction id>:<run id>", the head of every command id of the run: the run id is then
# written once (its own field, ``run_id``), not twice per step.
_RUN: Final = b"\x02"
_RUN_FIELD: Final = b'"run_id":"'
# What recurs in every succeeded step of every record, each written as one byte: the two that take a
# 3-step saga's record under 768 bytes, jemalloc's next size class down (each more costs every write
# another scan of the record, about a microsecond). Bytes 0x03-0x1f never occur in orjson's output (it
# escapes control characters), so replacing every occurrence, a user's key of the same name included,
# and restoring every byte reverses exactly.
_WORDS: Final = tuple(
    (bytes([0x03 + i]), word)
    for i, word in enumerate(
        (
            b'"succeeded_command":',
            b'"status":"succeeded"',
        )
    )
)


def compact_json(saga: SagaContext) -> bytes:
    """``saga`` as its record stores it: its JSON without the fields the record holds apart (id,
    workflow, state, version) or that hold their defaults, and with the transaction id, wherever it
    recurs (command ids), as one byte, the head of the run's command ids as another, and what every
    succeeded step repeats as one byte each. :func:`saga_json` reverses it. Generic over the fields, so a
    field added to the saga is stored too.

    Raises:
        orjson.JSONEncodeError: a value in the saga is not JSON-serialisable.
    """
    fields = _saga_fields(saga.__dict__)
    steps = fields.get("steps")
    if steps:
        step_fields = _step_fields
        fields["steps"] = {name: step_fields(rt.__dict__) for name, rt in steps.items()}
    raw = orjson.dumps(fields, option=orjson.OPT_UTC_Z)
    tx = _escaped(saga.transaction_id)
    if saga.run_id:
        raw = raw.replace(tx + b":" + _escaped(saga.run_id) + b":", _RUN)
    raw = raw.replace(tx, _TX)
    for byte, word in _WORDS:
        raw = raw.replace(word, byte)
    return raw


def _escaped(text: str) -> bytes:
    return orjson.dumps(text)[1:-1]


def load_record(record: bytes) -> tuple[list[bytes], bytes]:
    """The fields (by :class:`RecordField`) and the compact saga JSON of a saga's record.

    Raises:
        ValueError: ``record`` is not a saga's record.
    """
    fields: list[bytes] = []
    pos = 0
    for _ in RecordField:
        colon = record.index(RECORD_SEP, pos)
        end = colon + 1 + int(record[pos:colon])
        if end > len(record):
            raise ValueError("a record field runs past the record's end")
        fields.append(record[colon + 1 : end])
        pos = end
    return fields, record[pos:]


def saga_json(transaction_id: str, record: bytes) -> bytes:
    """The saga JSON (as :meth:`SagaContext.from_json` reads it) of ``transaction_id``'s record.

    Raises:
        ValueError: ``record`` is not a saga's record.
    """
    fields, body = load_record(record)
    if not body.startswith(b"{"):
        raise ValueError("a record whose saga is not a JSON object")
    tx = _escaped(transaction_id)
    head = b"".join(
        (
            b'{"transaction_id":"',
            tx,
            b'","workflow_id":',
            orjson.dumps(fields[RecordField.WORKFLOW - 1].decode()),
            b',"state":',
            orjson.dumps(fields[RecordField.STATE - 1].decode()),
            b',"version":',
            fields[RecordField.VERSION - 1],
            b"," if len(body) > 2 else b"",
        )
    )
    body = body[1:]
    for byte, word in reversed(_WORDS):
        body = body.replace(byte, word)
    if _RUN in body:
        # The saga's own field is the last: only "data" and "step_results", before it, hold a user's keys.
        at = body.rindex(_RUN_FIELD) + len(_RUN_FIELD)
        body = body.replace(_RUN, tx + b":" + body[at : body.index(b'"', at)] + b":")
    return head + body.replace(_TX, tx)


# ---------------------------------------------------------------- the batch


def epoch_ms(when: datetime) -> int:
    """``when`` in whole milliseconds since the epoch: an index score. Whole numbers, since a double
    that Lua or Redis prints back may not round-trip, and a cursor must name a score exactly."""
    return int(when.timestamp() * 1000)


def pack(writes: Sequence[TransitionWrite]) -> tuple[bytes, bytes]:
    """The script's two arguments for ``writes``: the JSON document, one row per write by
    :class:`WriteField`, and the raw values, each write's saga JSON (:func:`compact_json`), outbox
    entry (under its new version) and timer entries in that order.

    Raises:
        ValidationError: a write's saga is not its transaction's, not at ``expected_version + 1``, or
            cannot be stored.
        orjson.JSONEncodeError: a write's ids cannot be encoded.
    """
    packed: list[tuple[Any, ...]] = []
    append = packed.append
    data: list[bytes] = []
    put = data.append
    for w in writes:
        saga = check_write(w)
        digest = event_digest(w.event_id)
        if saga is None:
            # By WriteField, as below.
            append((digest, w.transaction_id, w.expected_version, 0, 0, "", "", 0, (), w.cancel_timers, 0))
            continue
        try:
            ctx = compact_json(saga)
        except orjson.JSONEncodeError as exc:
            raise ValidationError(f"saga {saga.transaction_id!r} cannot be stored: {exc}") from None
        version = saga.version
        put(ctx)
        entry_len = 0
        if w.outbox:
            entry = dump_outbox(version, w.outbox)
            put(entry)
            entry_len = len(entry)
        timers: list[tuple[str, float, int]] | tuple[()] = ()
        if w.timers:
            timers = []
            for t in w.timers:
                timer_entry = dump_timer(t)
                put(timer_entry)
                timers.append((t.timer_id, t.due_at, len(timer_entry)))  # by TimerField
        # A tuple in WriteField order, not a row built through the enum: this runs once per transition
        # on the hot path (DESIGN section 7). tests/backends/test_redis_store_unit.py checks the order.
        append(
            (
                digest,
                w.transaction_id,
                w.expected_version,
                version,
                len(ctx),
                saga.workflow_id,
                saga.state,  # orjson writes a str Enum as its value
                entry_len,
                timers,
                w.cancel_timers,
                epoch_ms(saga.updated_at),
            )
        )
    return orjson.dumps(packed), b"".join(data)
