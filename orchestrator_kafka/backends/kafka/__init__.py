"""The Kafka event bus: :class:`KafkaEventBus`, an :class:`~orchestrator_kafka.ports.IEventBus` on aiokafka,
:class:`KafkaSubscription`, the consumer-group member its ``subscribe`` returns, and
:class:`KafkaMessageSubscription`, the one its ``consume`` returns.

What it promises (DESIGN sections 5 and 7): ``publish`` returns once every message is acknowledged
(``acks=all``, idempotent producer), sending whole record batches; ``subscribe`` returns once the member
has its partitions, and a new group starts from the earliest offset; a handler gets whole ``getmany``
batches, committed once per batch after it (and its completion) finished, redelivered when it raised;
``consume`` runs each message in a slot of its own and commits each partition's watermark.

The modules, one job each:

* ``bus``: the facade, :class:`KafkaEventBus`: settings, making the aiokafka clients, start and stop, and
  handing each call to the module below that does it.
* ``publisher``: publishing: record batches per (topic, partition), partitions chosen as the Java
  client does, deliveries awaited together, a dead producer replaced.
* ``subscription``: :class:`KafkaSubscription`: the consume loop, completions, commits, rewinds after a
  failure, and the rebalance listener.
* ``message_subscription``: :class:`KafkaMessageSubscription`: fetching only as many messages as slots
  are free, pausing while none is, draining revoked partitions (the slots and watermarks themselves are
  shared with the in-memory bus: ``backends/slots.py``, ``backends/watermarks.py``).
* ``admin``: creating topics when first used and waiting until their partitions have leaders.
* ``reader``: the operator read of a whole topic outside any consumer group.
* ``aiokafka_workarounds``: every workaround of an aiokafka bug, each citing its upstream issue; the only
  module that touches aiokafka's private attributes.
* ``teardown``: bounded, quiet closing of aiokafka clients.

aiokafka ships no type stubs, so its objects are ``Any`` here and never leak out of this package.
Headers pass through untouched both ways: the telemetry module puts W3C ``traceparent`` in them.
"""

from __future__ import annotations

from .bus import KafkaEventBus
from .message_subscription import KafkaMessageSubscription
from .subscription import KafkaSubscription

__all__ = ["KafkaEventBus", "KafkaMessageSubscription", "KafkaSubscription"]
