"""Dead letters: a message that cannot be handled goes to the dead-letter topic with its original key,
bytes and headers, plus headers that say why and where it came from. Shared by the orchestrator and the
worker.
"""

from __future__ import annotations

from .constants import (
    HEADER_DLQ_DETAIL,
    HEADER_DLQ_OFFSET,
    HEADER_DLQ_PARTITION,
    HEADER_DLQ_REASON,
    HEADER_DLQ_TOPIC,
    HEADER_DLQ_TRUNCATED,
)
from .values import InboundMessage, OutboxMessage

# The most a dead letter's key, value and headers may take: under the bus's 1 MiB record batch limit
# with room for the batch and record framing.
_DEAD_LETTER_BYTES = 1_040_000


def dead_letter(message: InboundMessage, topic: str, reason: str, detail: str) -> OutboxMessage:
    """The dead-letter record of ``message``: its original key, bytes and headers, plus why.

    A message close to the broker's size limit no longer fits once the reason headers are added; its
    value is then cut to fit and ``dlq.truncated`` gives the original length (the whole message stays on
    its source topic, at the partition and offset the headers name). Without that, publishing its dead
    letter would fail for ever and the message would block its partition.
    """
    headers: tuple[tuple[str, bytes], ...] = (
        *message.headers,
        (HEADER_DLQ_REASON, reason.encode()),
        (HEADER_DLQ_DETAIL, detail[:1000].encode()),
        (HEADER_DLQ_TOPIC, message.topic.encode()),
        (HEADER_DLQ_PARTITION, str(message.partition).encode()),
        (HEADER_DLQ_OFFSET, str(message.offset).encode()),
    )
    key = (message.key or b"").decode("utf-8", "replace")
    value = message.value or b""
    framing = len(key.encode()) + sum(len(k.encode()) + len(v) + 16 for k, v in headers) + 64
    if len(value) + framing > _DEAD_LETTER_BYTES:
        headers = (*headers, (HEADER_DLQ_TRUNCATED, str(len(value)).encode()))
        value = value[: max(0, _DEAD_LETTER_BYTES - framing - 64)]
    return OutboxMessage(topic, key, value, headers)
