"""Paged listing of sagas, shared by the state stores: the query a page asks (:class:`PageQuery`), its
opaque cursor, and the merge of the candidates each index gave (:func:`merge_page`).

A listing reads one index per (state, workflow), each sorted by (score, transaction id), the score being
when the saga entered its state (its ``updated_at``, epoch milliseconds). A page takes up to ``limit``
members from each matching index after the cursor, merges them and keeps the first ``limit``: its cost
grows with the number of matching indexes and ``limit``, never with the number of sagas. A saga that
changes state while an operator pages moves to the end, so it is listed again rather than missed; a saga
that does not change is listed once; new sagas come last.

Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from .context import WorkflowState
from .errors import ValidationError

__all__ = ["DEFAULT_PAGE_LIMIT", "PageQuery", "decode_cursor", "encode_cursor", "merge_page", "page_query"]

DEFAULT_PAGE_LIMIT = 100
# A page is one reply: an operator asking for more pages through them.
MAX_PAGE_LIMIT = 10_000

Position = tuple[int, str]
"""Where a member stands in an index: (score, transaction id)."""


@dataclass(frozen=True, slots=True)
class PageQuery:
    """What one page reads: the indexes of ``states`` (of ``workflow_id``, or of every workflow), up to
    ``limit`` members each, strictly after ``after`` and strictly before score ``before``.

    ``after`` is a (score, transaction id) position, or (score, None) for after every member of that
    score; None starts at the first member.
    """

    states: tuple[str, ...]
    workflow_id: str | None
    limit: int
    after: tuple[int, str | None] | None
    before: int | None


def bound_ms(when: datetime) -> int:
    """``when`` in whole milliseconds since the epoch (an index score).

    Raises:
        ValidationError: ``when`` has no time zone (it would be read as local time).
    """
    if when.tzinfo is None:
        raise ValidationError(f"a listing bound needs a time zone, not the naive {when.isoformat()!r}")
    return int(when.timestamp() * 1000)


def encode_cursor(position: Position) -> str:
    """The opaque cursor of the page that starts after ``position``."""
    score, tx = position
    return base64.urlsafe_b64encode(f"{score}:{tx}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> Position:
    """The position ``cursor`` starts after.

    Raises:
        ValidationError: ``cursor`` is not one this module made.
    """
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        score, sep, tx = raw.partition(":")
        if not sep or not tx or not score.isdigit():
            raise ValueError("not a score and an id")
        return int(score), tx
    except (ValueError, binascii.Error, UnicodeDecodeError, TypeError, AttributeError):
        raise ValidationError(f"malformed cursor {cursor!r}: pass back a cursor a listing gave") from None


def page_query(
    workflow_id: str | None,
    state: str | None,
    *,
    limit: int,
    cursor: str | None,
    updated_after: datetime | None,
    updated_before: datetime | None,
) -> PageQuery:
    """The page that ``list_sagas`` asks for, checked.

    Raises:
        ValidationError: an unknown state, a malformed cursor, a limit out of 1 to 10,000, or a naive
            bound.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE_LIMIT:
        raise ValidationError(f"limit must be a whole number from 1 to {MAX_PAGE_LIMIT}, not {limit!r}")
    if state is None:
        states = tuple(s.value for s in WorkflowState)
    else:
        try:
            states = (WorkflowState(state).value,)
        except ValueError:
            known = ", ".join(s.value for s in WorkflowState)
            raise ValidationError(f"unknown state {state!r}: one of {known}") from None
    after: tuple[int, str | None] | None = None if cursor is None else decode_cursor(cursor)
    if updated_after is not None:
        floor = bound_ms(updated_after)
        # The later of the two bounds wins: a cursor behind the floor starts at the floor.
        if after is None or floor >= after[0]:
            after = (floor, None)
    before = None if updated_before is None else bound_ms(updated_before)
    return PageQuery(states, workflow_id, limit, after, before)


def merge_page(candidates: Iterable[Position], limit: int, more: bool) -> tuple[list[Position], str | None]:
    """The first ``limit`` of ``candidates`` (every index's members after the cursor), in (score, id)
    order, and the cursor of the next page: None when the indexes had no more (``more`` False) and
    nothing was left over. A next page may turn out empty; no member is ever skipped."""
    ordered = sorted(candidates)
    page = ordered[:limit]
    if page and (more or len(ordered) > limit):
        return page, encode_cursor(page[-1])
    return page, None
