"""Names in one place: topics, Redis keys, Kafka header names, defaults."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_TOPIC_PREFIX = "saga"
# The Redis store's keys live under this prefix; their layout is RedisKeys in backends/redis/keys.py.
DEFAULT_KEY_PREFIX = "saga"
DEFAULT_BOOTSTRAP_SERVERS = "localhost:9092"
DEFAULT_REDIS_URL = "redis://localhost:6379/0"

ENV_BOOTSTRAP_SERVERS = "KAFKA_BOOTSTRAP_SERVERS"
ENV_REDIS_URL = "REDIS_URL"

SCHEMA_VERSION = "1.0"
SCHEMA_MAJOR = 1

# Kafka headers.
HEADER_DLQ_REASON = "dlq.reason"
HEADER_DLQ_DETAIL = "dlq.detail"
HEADER_DLQ_TOPIC = "dlq.source.topic"
HEADER_DLQ_PARTITION = "dlq.source.partition"
HEADER_DLQ_OFFSET = "dlq.source.offset"
# On a dead letter whose value had to be cut to fit: the original value's length in bytes.
HEADER_DLQ_TRUNCATED = "dlq.truncated"
# Redrive (orchestrator_kafka.redrive): on the copy sent back to the source topic, the dead letter it is a
# copy of ("<partition>:<offset>" of the dead-letter topic); on the marker left on the dead-letter topic,
# the letter it marks as sent back; on both, the id of the redrive request.
HEADER_DLQ_REDRIVE_FROM = "dlq.redrive.from"
HEADER_DLQ_REDRIVEN = "dlq.redriven"
HEADER_DLQ_REDRIVE_ID = "dlq.redrive.id"

# Consumer groups (prefixed by the topic prefix).
ORCHESTRATOR_GROUP = "orchestrator"
WORKER_GROUP = "worker"

# A saga remembers the ids of its last EVENTS_KEPT applied events, to recognise a redelivered one; an
# older duplicate is the engine's to recognise from the saga itself (a start for a saga that exists, a
# result for a settled attempt). A deleted saga's are remembered DEDUPE_TTL_SECONDS (both state stores
# take another as ``dedupe_ttl``): well past any redelivery window.
EVENTS_KEPT = 16
DEDUPE_TTL_SECONDS = 7 * 24 * 3600
# How long an ended saga's keys are kept (completed, compensated or cancelled), and a failed one's,
# which an operator must look at first. None in either keeps them for ever; nothing unfinished expires.
DEFAULT_RETENTION_SECONDS = 7 * 24 * 3600
DEFAULT_FAILED_RETENTION_SECONDS = 30 * 24 * 3600
# How long a claimed timer is leased before another orchestrator may fire it again.
TIMER_LEASE_SECONDS = 30.0
# How long a Redis store trusts what it knows of a partition's earliest timer (see claim_due_timers): at
# most this much later than due, a timer another store wrote is fired.
TIMER_RECHECK_SECONDS = 1.0
# How long a write waits for its min_replicas replicas to acknowledge it (Redis WAIT) before it fails.
DEFAULT_WAIT_TIMEOUT = 1.0
# Largest message accepted off the wire.
MAX_MESSAGE_BYTES = 1_000_000


@dataclass(frozen=True, slots=True)
class Topics:
    """The topic names of DESIGN section 5 under one prefix."""

    prefix: str = DEFAULT_TOPIC_PREFIX

    @property
    def start(self) -> str:
        return f"{self.prefix}.start"

    @property
    def results(self) -> str:
        return f"{self.prefix}.results"

    @property
    def events(self) -> str:
        return f"{self.prefix}.events"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}.dlq"

    def commands(self, worker_name: str) -> str:
        return f"{self.prefix}.commands.{worker_name}"

    def compensations(self, worker_name: str) -> str:
        return f"{self.prefix}.compensations.{worker_name}"

    def of_worker(self, worker_name: str) -> tuple[str, str]:
        """Both topics a worker named ``worker_name`` consumes (commands, then compensations): they are
        created together, so a worker subscribing to both never meets a missing one."""
        return self.commands(worker_name), self.compensations(worker_name)

    def group(self, name: str) -> str:
        return f"{self.prefix}.{name}"
