"""Which partition a saga's keys live in: :func:`partition_of`, the Kafka partition of its id."""

from __future__ import annotations

from functools import lru_cache

from aiokafka.partitioner import murmur2

__all__ = ["partition_of"]


# A saga's id is hashed again for each of its transitions while it runs: the sagas in flight are what
# need remembering. 8,192 is ~1.5 MB; 65,536 made an orchestrator's memory creep up for minutes.
@lru_cache(maxsize=8_192)
def partition_of(transaction_id: str, count: int) -> int:
    """The partition, of ``count``, that Kafka's default partitioner (aiokafka's and the Java client's:
    murmur2 of the key, positive, modulo the count) gives messages keyed by ``transaction_id``; so the
    orchestrator that consumes a saga's partition writes that partition's keys. Cached: a saga's id is
    hashed once for all its transitions, not once a step (murmur2 is pure Python)."""
    return int(murmur2(transaction_id.encode()) & 0x7FFFFFFF) % count
