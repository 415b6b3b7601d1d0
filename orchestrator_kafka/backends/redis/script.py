"""The Lua script of the Redis state store, as Redis runs it: ``scripts.lua`` after the definitions it
reads the key layout and the packed batch by, generated from :mod:`.keys` and :mod:`.packing`.

It is called as ``EVALSHA <SHA> 1 <a key of the partition> <op> <the partition's key prefix> <the op's
arguments...>``.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import Final

from .keys import lua_definitions as key_definitions
from .packing import lua_definitions as field_definitions

__all__ = ["SCRIPT", "SHA"]

_GENERATED: Final = "\n".join(
    (
        "-- Generated from orchestrator_kafka/backends/redis/keys.py and packing.py when the store is",
        "-- imported: the key layout (K) and the positions of the packed batch and record (W, T, R, RF).",
        key_definitions("ARGV[2]"),
        field_definitions(),
        "",
    )
)

SCRIPT: Final[str] = _GENERATED + resources.files("orchestrator_kafka.backends.redis").joinpath(
    "scripts.lua"
).read_text("utf-8")
SHA: Final[str] = hashlib.sha1(SCRIPT.encode("utf-8"), usedforsecurity=False).hexdigest()
