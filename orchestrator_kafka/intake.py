"""What the orchestrator consumes, made into events: a message that is not a valid event of its topic
becomes a dead letter, with the reason, logged and counted."""

from __future__ import annotations

from collections.abc import Sequence

from . import codec
from .constants import Topics
from .dead_letters import dead_letter
from .engine import Event
from .errors import DecodeError
from .models import CancelSaga, RepairSaga, StartSaga, StepResult
from .ports import ILogger
from .telemetry import Telemetry
from .values import InboundMessage, OutboxMessage

# What a client may send to the start topic.
_REQUESTS = (StartSaga, CancelSaga, RepairSaga)


class Intake:
    """Decodes the orchestrator's consumed batches and makes the dead letters of what it cannot take."""

    def __init__(self, topics: Topics, log: ILogger, telemetry: Telemetry) -> None:
        self.topics = topics
        self.telemetry = telemetry
        self._log = log

    def decode(
        self, batch: Sequence[InboundMessage]
    ) -> tuple[list[Event], list[InboundMessage], list[OutboxMessage]]:
        """The batch's events and the messages they came from; the dead letters of the rest: what does
        not decode, and events that do not belong on the topic they came from."""
        events: list[Event] = []
        sources: list[InboundMessage] = []
        dead: list[OutboxMessage] = []
        for message in batch:
            try:
                event = codec.decode(message.value)
            except DecodeError as exc:
                dead.append(self.dead(message, exc.reason, exc.detail))
                continue
            expected = (StepResult,) if message.topic == self.topics.results else _REQUESTS
            if not isinstance(event, expected):
                detail = f"{event.event_type} does not belong on {message.topic}"
                dead.append(self.dead(message, codec.UNEXPECTED_EVENT_TYPE, detail))
                continue
            events.append(event)
            sources.append(message)
        return events, sources, dead

    def dead(self, message: InboundMessage, reason: str, detail: str) -> OutboxMessage:
        """The dead letter of ``message``, logged and counted."""
        self.telemetry.dead_letter(reason, message.topic)
        self._log.warning(
            "dead letter from %s[%d]@%d: %s (%s)",
            message.topic,
            message.partition,
            message.offset,
            reason,
            detail,
        )
        return dead_letter(message, self.topics.dlq, reason, detail)
