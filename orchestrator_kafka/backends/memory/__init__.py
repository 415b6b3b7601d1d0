"""In-process backends: :class:`InMemoryEventBus` and :class:`InMemoryStateStore`.

They are real, supported backends (the embedded default for demos, users' unit tests and single-process
use) with the semantics of the Kafka and Redis ones: topics with partitions chosen by key, consumer
groups with committed offsets and at-least-once redelivery; versioned atomic transitions, event dedupe,
outboxes, durable timers and indexes. Every operation is atomic with respect to other coroutines of the
event loop, because none awaits inside its critical section.
"""

from __future__ import annotations

from .bus import InMemoryEventBus
from .store import InMemoryStateStore

__all__ = ["InMemoryEventBus", "InMemoryStateStore"]
