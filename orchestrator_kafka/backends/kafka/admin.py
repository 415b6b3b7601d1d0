"""Topic admin: creating the bus's topics (``partitions`` x ``replication_factor``, see
:func:`replication`) when first used, and waiting until their partitions have leaders that serve them,
with aiokafka's admin client."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from aiokafka.admin import NewTopic
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    KafkaError,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
    for_code,
)

from ...errors import EventBusError
from .aiokafka_workarounds import partitions_served

__all__ = ["TopicAdmin", "replication"]

_log = logging.getLogger("orchestrator_kafka.kafka")

# Poll interval while waiting for a new topic's partitions to get leaders.
_LEADER_POLL = 0.05

# The default replication: three copies where there are three brokers (DESIGN section 10), and a write
# acknowledged (acks=all) only once two of them have it, so one broker can be lost, or down for a
# restart, without losing an acknowledged message or refusing writes.
DEFAULT_MAX_REPLICAS = 3
_MIN_INSYNC = 2


def replication(replication_factor: int | None, brokers: int) -> tuple[int, dict[str, str]]:
    """The replication factor and topic configs of a new topic.

    ``replication_factor`` None means min(3, ``brokers``). A topic of three replicas or more gets
    ``min.insync.replicas=2``: with the producer's ``acks=all`` a write then survives the loss of any one
    broker. Fewer replicas keep the broker's default (1), since 2 of 2 would refuse every write while
    one broker is down. ``brokers`` are those in the metadata when the topic is created: while one of
    three is down, a new topic gets two replicas (Kafka would refuse three).
    """
    factor = replication_factor if replication_factor is not None else min(DEFAULT_MAX_REPLICAS, brokers)
    factor = max(factor, 1)
    configs = {"min.insync.replicas": str(_MIN_INSYNC)} if factor >= DEFAULT_MAX_REPLICAS else {}
    return factor, configs


class TopicAdmin:
    """The bus's admin client and the topics known to exist; :meth:`ensure` creates the others.

    ``timeout`` bounds a CreateTopics request and the wait for the new partitions' leaders;
    ``replication_factor`` None means min(3, brokers) (see :func:`replication`).
    """

    def __init__(self, *, partitions: int, replication_factor: int | None, timeout: float) -> None:
        self._partitions = partitions
        self._replication_factor = replication_factor
        self._timeout = timeout
        # The started admin client while the bus runs (the bus sets it in start and clears it in stop).
        self.client: Any = None
        # Topics created or found, never asked about again.
        self.known: set[str] = set()
        self._lock = asyncio.Lock()

    async def ensure(self, topics: Sequence[str]) -> None:
        """Create the topics of ``topics`` not known yet and wait for their leaders; see
        :meth:`KafkaEventBus.ensure_topics`. The caller checks that the bus is started."""
        if all(t in self.known for t in topics):
            return
        async with self._lock:
            missing = sorted({t for t in topics if t not in self.known})
            if not missing:
                return
            try:
                present = await self._create_topics(missing)
                if present:
                    await self._wait_for_leaders(present)
            except (KafkaError, OSError) as exc:
                raise EventBusError(f"could not create topics {missing}: {exc!r}") from exc
            self.known.update(missing)

    async def _create_topics(self, names: list[str]) -> list[str]:
        """Issue one CreateTopics request; the names created now or already there. A topic "already
        there" may have been created by another client an instant ago, so its leaders are awaited too;
        topics this client may not create are left out (the operator manages them)."""
        brokers = 0
        if self._replication_factor is None:
            # Asked at each creation, not cached: a broker added since the last one counts.
            brokers = len((await self.client.describe_cluster())["brokers"])
        factor, configs = replication(self._replication_factor, brokers)
        new = [NewTopic(n, self._partitions, factor, topic_configs=configs) for n in names]
        response = await self.client.create_topics(new, timeout_ms=int(self._timeout * 1000))
        present: list[str] = []
        for entry in response.topic_errors:
            # (topic, error_code) in v0, (topic, error_code, error_message) from v1 on. aiokafka
            # returns the codes instead of raising them.
            name, code = entry[0], entry[1]
            error = for_code(code) if code else None
            if error is None or error is TopicAlreadyExistsError:
                present.append(name)
                continue
            if error in (TopicAuthorizationFailedError, ClusterAuthorizationFailedError):
                _log.warning("not allowed to create topic %s; assuming the operator manages it", name)
                continue
            message = entry[2] if len(entry) > 2 and entry[2] else error.__name__
            raise EventBusError(f"Kafka refused to create topic {name!r}: {message}")
        return present

    async def _wait_for_leaders(self, names: list[str]) -> None:
        # CreateTopics can return before every partition has a leader in the metadata; a consumer
        # joining then would be assigned none of the topic's partitions, and a producer would wait. And
        # a leader named in the metadata may not serve its partition yet: a new group's consumer resetting
        # its offsets then logs NotLeaderForPartitionError at ERROR (see partitions_served).
        try:
            async with asyncio.timeout(self._timeout):
                while True:
                    described = await self.client.describe_topics(names)
                    if _all_led(described, names):
                        try:
                            if await partitions_served(self.client, _leaders(described)):
                                return
                        except KafkaError:
                            pass  # asked too early (a leader still loading): ask again
                    await asyncio.sleep(_LEADER_POLL)
        except TimeoutError as exc:
            raise EventBusError(f"topics {names} got no partition leaders within {self._timeout:g}s") from exc


def _leaders(described: Iterable[Any]) -> dict[int, list[tuple[str, int]]]:
    """The described topics' partitions by leader node id."""
    out: dict[int, list[tuple[str, int]]] = {}
    for topic in described:
        for p in topic["partitions"]:
            out.setdefault(p["leader"], []).append((topic["topic"], p["partition"]))
    return out


def _all_led(described: Iterable[Any], names: Sequence[str]) -> bool:
    """True when every topic of ``names`` is in the metadata with all its partitions led."""
    seen: set[str] = set()
    for topic in described:
        if topic["error_code"] != 0 or not topic["partitions"]:
            return False
        if any(p["error_code"] != 0 or p["leader"] < 0 for p in topic["partitions"]):
            return False
        seen.add(topic["topic"])
    return seen.issuperset(names)
