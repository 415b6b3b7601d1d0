"""Dead letters read back, and sent back to where they came from (redrive).

Pure: it reads records of the dead-letter topic handed to it and makes the records a redrive publishes;
:class:`~orchestrator_kafka.client.SagaClient` does the reading and the publishing.

A redrive publishes a copy of each chosen letter to its source topic (the original key, value and headers,
plus ``dlq.redrive.from`` and ``dlq.redrive.id``), and only then a *marker* on the dead-letter topic: a
record with the letter's key and ``dlq.*`` headers, an empty value, and ``dlq.redriven`` naming the
letter. A letter with a marker is listed as redriven and is not sent again. A crash between the two
publishes leaves a letter sent but not marked; sending it again later is harmless, since the orchestrator
deduplicates events by ``event_id`` and workers commands by ``command_id``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .constants import (
    HEADER_DLQ_DETAIL,
    HEADER_DLQ_OFFSET,
    HEADER_DLQ_PARTITION,
    HEADER_DLQ_REASON,
    HEADER_DLQ_REDRIVE_FROM,
    HEADER_DLQ_REDRIVE_ID,
    HEADER_DLQ_REDRIVEN,
    HEADER_DLQ_TOPIC,
    HEADER_DLQ_TRUNCATED,
)
from .errors import ValidationError
from .values import Headers, InboundMessage, OutboxMessage

__all__ = ["DeadLetter", "Redrive", "letters_of", "parse_position", "plan", "select"]

# The headers a dead letter adds to the message it holds; a copy sent back goes without them.
_ADDED = frozenset(
    {
        HEADER_DLQ_REASON,
        HEADER_DLQ_DETAIL,
        HEADER_DLQ_TOPIC,
        HEADER_DLQ_PARTITION,
        HEADER_DLQ_OFFSET,
        HEADER_DLQ_TRUNCATED,
        HEADER_DLQ_REDRIVE_FROM,
        HEADER_DLQ_REDRIVE_ID,
    }
)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One record of the dead-letter topic that holds a refused message."""

    partition: int
    offset: int
    key: str
    reason: str
    detail: str
    source_topic: str
    source_partition: int | None
    source_offset: int | None
    truncated: bool
    value: bytes
    headers: Headers
    """The refused message's own headers, without those the dead-lettering and a redrive added."""
    redriven_by: str | None = None
    """The id of the redrive request that sent it back, if one did."""
    came_from: str | None = None
    """When the refused message was itself a redriven copy: the letter it was a copy of."""

    @property
    def position(self) -> str:
        """``<partition>:<offset>`` on the dead-letter topic."""
        return f"{self.partition}:{self.offset}"

    def to_dict(self) -> dict[str, Any]:
        """The letter as JSON values (its value as text, undecodable bytes replaced)."""
        return {
            "position": self.position,
            "key": self.key,
            "reason": self.reason,
            "detail": self.detail,
            "source_topic": self.source_topic,
            "source_partition": self.source_partition,
            "source_offset": self.source_offset,
            "truncated": self.truncated,
            "redriven_by": self.redriven_by,
            "came_from": self.came_from,
            "value": self.value.decode("utf-8", "replace"),
        }


@dataclass(frozen=True, slots=True)
class Redrive:
    """What one redrive request did: the letters sent back, and those refused with why."""

    request_id: str
    redriven: list[DeadLetter]
    refused: list[tuple[DeadLetter, str]]


def letters_of(records: Iterable[InboundMessage]) -> list[DeadLetter]:
    """The dead letters among the records of a dead-letter topic, in the order given, each marked with the
    redrive that sent it back (markers themselves are not letters)."""
    letters: list[DeadLetter] = []
    redriven: dict[str, str] = {}
    for record in records:
        named = {k: v.decode("utf-8", "replace") for k, v in record.headers}
        marks = named.get(HEADER_DLQ_REDRIVEN)
        if marks is not None:
            redriven[marks] = named.get(HEADER_DLQ_REDRIVE_ID, "")
            continue
        letters.append(
            DeadLetter(
                partition=record.partition,
                offset=record.offset,
                key=(record.key or b"").decode("utf-8", "replace"),
                reason=named.get(HEADER_DLQ_REASON, ""),
                detail=named.get(HEADER_DLQ_DETAIL, ""),
                source_topic=named.get(HEADER_DLQ_TOPIC, ""),
                source_partition=_int(named.get(HEADER_DLQ_PARTITION)),
                source_offset=_int(named.get(HEADER_DLQ_OFFSET)),
                truncated=HEADER_DLQ_TRUNCATED in named,
                value=record.value or b"",
                headers=tuple((k, v) for k, v in record.headers if k not in _ADDED),
                came_from=named.get(HEADER_DLQ_REDRIVE_FROM),
            )
        )
    return [
        dataclasses.replace(letter, redriven_by=redriven[letter.position])
        if letter.position in redriven
        else letter
        for letter in letters
    ]


def parse_position(text: str) -> str:
    """``<partition>:<offset>`` checked and normalised.

    Raises:
        ValidationError: not two non-negative integers joined by a colon.
    """
    partition, colon, offset = text.strip().partition(":")
    if not colon or not partition.isdigit() or not offset.isdigit():
        raise ValidationError(f"a dead letter's position is <partition>:<offset>, e.g. 0:17; not {text!r}")
    return f"{int(partition)}:{int(offset)}"


def select(
    letters: Iterable[DeadLetter],
    *,
    positions: Sequence[str] = (),
    reason: str | None = None,
    transaction_id: str | None = None,
) -> list[DeadLetter]:
    """The letters that match every criterion given: at one of ``positions``, with ``reason``, with the key
    ``transaction_id``.

    Raises:
        ValidationError: no criterion, or a malformed position.
    """
    wanted = {parse_position(p) for p in positions}
    if not wanted and reason is None and transaction_id is None:
        raise ValidationError("choose the dead letters: by position, reason or transaction id")
    return [
        letter
        for letter in letters
        if (not wanted or letter.position in wanted)
        and (reason is None or letter.reason == reason)
        and (transaction_id is None or letter.key == transaction_id)
    ]


def plan(
    letters: Iterable[DeadLetter], dlq_topic: str, request_id: str
) -> tuple[list[OutboxMessage], list[OutboxMessage], Redrive]:
    """The copies to publish to the source topics, then the markers to publish to ``dlq_topic``, and the
    report of request ``request_id``. A letter is refused when a redrive sent it back already, when its
    value was cut to fit the dead-letter topic, or when it does not say where it came from."""
    copies: list[OutboxMessage] = []
    markers: list[OutboxMessage] = []
    redriven: list[DeadLetter] = []
    refused: list[tuple[DeadLetter, str]] = []
    rid = request_id.encode()
    for letter in letters:
        if letter.redriven_by is not None:
            refused.append((letter, f"sent back already, by redrive {letter.redriven_by}"))
            continue
        if letter.truncated:
            refused.append(
                (
                    letter,
                    "its value was cut to fit the dead-letter topic; the whole message is at "
                    f"{letter.source_topic}[{letter.source_partition}]@{letter.source_offset}",
                )
            )
            continue
        if not letter.source_topic:
            refused.append((letter, "it does not say which topic it came from"))
            continue
        where = letter.position.encode()
        copies.append(
            OutboxMessage(
                letter.source_topic,
                letter.key,
                letter.value,
                (*letter.headers, (HEADER_DLQ_REDRIVE_FROM, where), (HEADER_DLQ_REDRIVE_ID, rid)),
            )
        )
        markers.append(
            OutboxMessage(
                dlq_topic,
                letter.key,
                b"",
                (
                    (HEADER_DLQ_REASON, letter.reason.encode()),
                    (HEADER_DLQ_TOPIC, letter.source_topic.encode()),
                    (HEADER_DLQ_REDRIVEN, where),
                    (HEADER_DLQ_REDRIVE_ID, rid),
                ),
            )
        )
        redriven.append(dataclasses.replace(letter, redriven_by=request_id))
    return copies, markers, Redrive(request_id, redriven, refused)


def _int(text: str | None) -> int | None:
    return int(text) if text is not None and text.isdigit() else None
