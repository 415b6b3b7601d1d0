"""The check every state store makes of a write before it applies anything of a batch."""

from __future__ import annotations

from ..context import SagaContext
from ..errors import ValidationError
from ..values import TransitionWrite

__all__ = ["check_write", "saga_json"]


def saga_json(write: TransitionWrite) -> bytes | None:
    """The stored form (JSON) of ``write``'s saga, or None for a write without one.

    Raises:
        ValidationError: the saga is not the write's transaction's, is not at ``expected_version + 1``,
            or cannot be stored (a value that is not JSON-serialisable).
    """
    saga = check_write(write)
    return None if saga is None else saga.to_json()


def check_write(write: TransitionWrite) -> SagaContext | None:
    """``write``'s saga, or None for a write without one, checked against the write.

    Raises:
        ValidationError: the saga is not the write's transaction's or is not at ``expected_version + 1``.
    """
    saga = write.saga
    if saga is None:
        return None
    version = write.expected_version + 1
    if saga.version != version or saga.transaction_id != write.transaction_id:
        raise ValidationError(
            f"the write of event {write.event_id!r} for {write.transaction_id!r} carries saga "
            f"{saga.transaction_id!r} at version {saga.version}, not at {version}"
        )
    return saga
