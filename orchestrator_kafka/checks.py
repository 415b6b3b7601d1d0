"""Checks of what callers hand the public API: ids and saga contexts."""

from __future__ import annotations

from typing import Any

import orjson

from .errors import ValidationError

_MAX_ID = 200


def check_id(what: str, value: object) -> str:
    """``value`` if it is a usable id (a non-empty str of at most 200 characters).

    Raises:
        ValidationError: it is not.
    """
    if not isinstance(value, str) or not value or len(value) > _MAX_ID:
        raise ValidationError(
            f"{what} must be a non-empty str of at most {_MAX_ID} characters, got {value!r}"
        )
    return value


def check_context(initial_context: object) -> dict[str, Any]:
    """A JSON copy of ``initial_context``, so the saga shares no object with the caller.

    Raises:
        ValidationError: not a dict, or not JSON-serialisable.
    """
    if not isinstance(initial_context, dict):
        raise ValidationError(f"initial_context must be a dict, got {type(initial_context).__name__}")
    try:
        # Round-trip so the saga never shares a mutable object with the caller.
        copied = orjson.loads(orjson.dumps(initial_context))
    except TypeError as exc:
        raise ValidationError(f"initial_context must be JSON-serialisable: {exc}") from None
    if not isinstance(copied, dict):  # pragma: no cover - orjson maps a dict to a dict
        raise ValidationError("initial_context must be a dict")
    return copied
