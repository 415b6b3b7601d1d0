"""Process settings from the environment: the one place that names the variables the CLI, the Dockerfile,
the compose file and the Kubernetes manifests use.

Flags of the CLI override these; the library's classes take plain arguments and read nothing here, except
that ``KafkaEventBus`` and ``RedisStateStore`` fall back to ``KAFKA_BOOTSTRAP_SERVERS`` and ``REDIS_URL``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from .constants import (
    DEFAULT_BOOTSTRAP_SERVERS,
    DEFAULT_FAILED_RETENTION_SECONDS,
    DEFAULT_KEY_PREFIX,
    DEFAULT_REDIS_URL,
    DEFAULT_RETENTION_SECONDS,
    DEFAULT_TOPIC_PREFIX,
    ENV_BOOTSTRAP_SERVERS,
    ENV_REDIS_URL,
)
from .errors import ValidationError

if TYPE_CHECKING:
    from .backends.kafka import KafkaEventBus
    from .backends.redis import RedisStateStore

ENV_TOPIC_PREFIX = "ORCHESTRATOR_TOPIC_PREFIX"
ENV_KEY_PREFIX = "ORCHESTRATOR_KEY_PREFIX"
ENV_PARTITIONS = "ORCHESTRATOR_PARTITIONS"
ENV_REPLICATION_FACTOR = "ORCHESTRATOR_REPLICATION_FACTOR"
ENV_RETENTION = "ORCHESTRATOR_RETENTION"
ENV_FAILED_RETENTION = "ORCHESTRATOR_FAILED_RETENTION"
ENV_MIN_REPLICAS = "ORCHESTRATOR_MIN_REPLICAS"
ENV_SECURITY_PROTOCOL = "KAFKA_SECURITY_PROTOCOL"
ENV_SASL_MECHANISM = "KAFKA_SASL_MECHANISM"
ENV_SASL_USERNAME = "KAFKA_SASL_USERNAME"
ENV_SASL_PASSWORD = "KAFKA_SASL_PASSWORD"
ENV_HEALTH_PORT = "ORCHESTRATOR_HEALTH_PORT"
ENV_LOG_LEVEL = "ORCHESTRATOR_LOG_LEVEL"
# OpenTelemetry's own variables, read by telemetry.configure().
ENV_OTLP_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
ENV_SERVICE_NAME = "OTEL_SERVICE_NAME"


@dataclass(frozen=True, slots=True)
class Settings:
    """Where the services are and how this process names its topics and keys."""

    bootstrap_servers: str = DEFAULT_BOOTSTRAP_SERVERS
    redis_url: str = DEFAULT_REDIS_URL
    topic_prefix: str = DEFAULT_TOPIC_PREFIX
    key_prefix: str = DEFAULT_KEY_PREFIX
    # Seconds an ended (a failed) saga is kept in Redis; None keeps it for ever.
    retention: int | None = DEFAULT_RETENTION_SECONDS
    failed_retention: int | None = DEFAULT_FAILED_RETENTION_SECONDS
    partitions: int = 4
    # Replicas each Redis write waits for (WAIT); None: 1 when every primary has a replica, else 0.
    min_replicas: int | None = None
    # Replicas of each topic the bus creates; None means min(3, brokers), with min.insync.replicas=2
    # from three replicas on (see KafkaEventBus).
    replication_factor: int | None = None
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    health_port: int | None = None
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if self.replication_factor is not None and self.replication_factor < 1:
            raise ValidationError(
                f"{ENV_REPLICATION_FACTOR} must be at least 1, not {self.replication_factor}"
            )
        if not isinstance(logging.getLevelName(self.log_level.upper()), int):
            raise ValidationError(
                f"{ENV_LOG_LEVEL} must be DEBUG, INFO, WARNING, ERROR or CRITICAL, not {self.log_level!r}"
            )

    def event_bus(self, *, start_timeout: float = 30.0) -> KafkaEventBus:
        """A :class:`KafkaEventBus` on these settings (not started)."""
        from .backends.kafka import KafkaEventBus

        return KafkaEventBus(
            self.bootstrap_servers,
            topic_prefix=self.topic_prefix,
            partitions=self.partitions,
            replication_factor=self.replication_factor,
            security_protocol=self.security_protocol,
            sasl_mechanism=self.sasl_mechanism,
            sasl_plain_username=self.sasl_username,
            sasl_plain_password=self.sasl_password,
            start_timeout=start_timeout,
        )

    def state_store(self) -> RedisStateStore:
        """A :class:`RedisStateStore` on these settings (it connects on first use)."""
        from .backends.redis import RedisStateStore

        return RedisStateStore(
            self.redis_url,
            key_prefix=self.key_prefix,
            retention=self.retention,
            failed_retention=self.failed_retention,
            min_replicas=self.min_replicas,
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every variable of :data:`ENV_VARS`; unset or empty ones keep their defaults.

        Raises:
            ValidationError: a number that is not one, or an unknown log level.
        """
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for field in fields(cls):
            raw = env.get(ENV_VARS[field.name], "").strip()
            if not raw:
                continue
            if field.name in ("retention", "failed_retention"):
                values[field.name] = parse_retention(ENV_VARS[field.name], raw)
            elif field.name == "min_replicas":
                values[field.name] = parse_min_replicas(ENV_VARS[field.name], raw)
            elif field.name in ("partitions", "replication_factor", "health_port"):
                try:
                    values[field.name] = int(raw)
                except ValueError:
                    raise ValidationError(
                        f"{ENV_VARS[field.name]} must be a whole number, not {raw!r}"
                    ) from None
            else:
                values[field.name] = raw
        return cls(**values)  # type: ignore[arg-type]


def parse_retention(name: str, raw: str) -> int | None:
    """A retention as an operator writes it: whole seconds, or ``none`` (kept for ever).

    Raises:
        ValidationError: anything else, named ``name``.
    """
    text = raw.strip().lower()
    if text in ("none", "forever"):
        return None
    if not text.isdigit() or int(text) <= 0:
        raise ValidationError(f"{name} must be a positive whole number of seconds or 'none', not {raw!r}")
    return int(text)


def parse_min_replicas(name: str, raw: str) -> int | None:
    """A replica count as an operator writes it: a whole number of at least 0, or ``auto`` (1 when
    every Redis primary has a replica, else 0).

    Raises:
        ValidationError: anything else, named ``name``.
    """
    text = raw.strip().lower()
    if text == "auto":
        return None
    if not text.isdigit():
        raise ValidationError(f"{name} must be a whole number of at least 0 or 'auto', not {raw!r}")
    return int(text)


ENV_VARS: dict[str, str] = {
    "bootstrap_servers": ENV_BOOTSTRAP_SERVERS,
    "redis_url": ENV_REDIS_URL,
    "topic_prefix": ENV_TOPIC_PREFIX,
    "key_prefix": ENV_KEY_PREFIX,
    "retention": ENV_RETENTION,
    "failed_retention": ENV_FAILED_RETENTION,
    "partitions": ENV_PARTITIONS,
    "min_replicas": ENV_MIN_REPLICAS,
    "replication_factor": ENV_REPLICATION_FACTOR,
    "security_protocol": ENV_SECURITY_PROTOCOL,
    "sasl_mechanism": ENV_SASL_MECHANISM,
    "sasl_username": ENV_SASL_USERNAME,
    "sasl_password": ENV_SASL_PASSWORD,
    "health_port": ENV_HEALTH_PORT,
    "log_level": ENV_LOG_LEVEL,
}
"""Each setting's environment variable."""

OTEL_ENV_VARS = (ENV_OTLP_ENDPOINT, ENV_SERVICE_NAME)
"""OpenTelemetry's standard variables this project honours."""
