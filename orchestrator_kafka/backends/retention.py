"""The check both state stores make of their retention settings."""

from __future__ import annotations

from ..errors import ValidationError

__all__ = ["check_retention"]


def check_retention(name: str, seconds: int | None) -> int | None:
    """``seconds``, checked: a positive whole number of seconds, or None (kept for ever).

    Raises:
        ValidationError: anything else, named ``name``.
    """
    if seconds is None:
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, int) or seconds <= 0:
        raise ValidationError(f"{name} must be a positive whole number of seconds or None, not {seconds!r}")
    return seconds
