"""The Redis state store, :class:`RedisStateStore`, and its key layout, :class:`RedisKeys`.

``store`` is the store; ``keys`` the key layout, defined and documented once; ``packing`` what the
store sends its Lua script and stores, with the field positions both sides read it by; ``script`` the
script as Redis runs it (``scripts.lua`` after definitions generated from ``keys`` and ``packing``).
"""

from __future__ import annotations

from .keys import RedisKeys
from .store import RedisStateStore

__all__ = ["RedisKeys", "RedisStateStore"]
