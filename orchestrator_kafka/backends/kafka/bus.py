"""The bus facade: :class:`KafkaEventBus`, an :class:`~orchestrator_kafka.ports.IEventBus` on aiokafka.

It holds the settings, makes the aiokafka clients (one shared producer, one admin client, a consumer per
subscription or read), starts and stops them, and hands each job to its module: publishing to
``publisher``, topics to ``admin``, subscriptions to ``subscription``, the operator read to ``reader``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import ssl
from collections.abc import AsyncIterator, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from ...constants import DEFAULT_BOOTSTRAP_SERVERS, DEFAULT_TOPIC_PREFIX, ENV_BOOTSTRAP_SERVERS
from ...errors import EventBusError, ValidationError
from ...ports import BatchHandler, IEventBus, MessageHandler, Subscription, Watch, WatchHandler
from ...values import InboundMessage, OutboxMessage
from .admin import TopicAdmin
from .message_subscription import KafkaMessageSubscription
from .publisher import MAX_BATCH_BYTES, MAX_REQUEST_BYTES, Publisher
from .reader import read_topic
from .subscription import KafkaSubscription
from .teardown import quietly
from .watch import KafkaWatch

__all__ = ["KafkaEventBus"]

# Default of the fetch_max_wait_ms argument: how long the broker may hold a fetch with nothing new. aiokafka
# keeps one fetch in flight per broker, built from the partitions with nothing buffered. When those are
# caught up the broker holds the fetch that long, and a partition that still had buffered records (a
# backlog larger than max_batch) is not fetched again until it returns: its next records wait that long.
# The default 500 ms made 20,000-message runs bimodal (24k vs 45k msg/s); 100 ms bounds the stall and
# costs an idle consumer 10 empty fetches a second.
_FETCH_MAX_WAIT_MS = 100

_SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
_SASL_MECHANISMS = ("PLAIN", "GSSAPI", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER")


class KafkaEventBus(IEventBus):
    """An :class:`IEventBus` on Apache Kafka through aiokafka.

    ``bootstrap_servers`` None means ``$KAFKA_BOOTSTRAP_SERVERS`` or ``localhost:9092``. New topics get
    ``partitions`` partitions and ``replication_factor`` replicas; None (the default) means min(3, the
    brokers in the metadata), and a topic of three replicas or more gets ``min.insync.replicas=2``, so
    with the producer's ``acks=all`` an acknowledged message survives the loss of one broker. The security
    settings go to the producer, every consumer and the admin client alike. ``start_timeout`` bounds
    connecting, waiting for a partition assignment, and how long ``stop`` waits for a batch in hand.

    ``linger_ms`` (default 2) is how long the producer waits between two requests, but only under load
    (about 2,000 messages a second and more; see :mod:`.publisher`): when idle, each message goes at once.

    ``fetch_max_wait_ms`` (default 100) is how long the broker may hold a subscriber's fetch when it has
    no new records. aiokafka keeps one fetch in flight per broker, so a partition with a backlog larger
    than ``max_batch`` is not fetched again until a held fetch for the caught-up partitions returns:
    this bounds that stall. Lower means less latency under backlog and more empty fetches when idle
    (1000 / ``fetch_max_wait_ms`` a second per subscription); aiokafka's and Kafka's default of 500 made
    20,000-message runs bimodal (24k vs 45k msg/s).

    Raises:
        ValidationError: an inconsistent setting (unknown security protocol, SSL without a context, ...).
    """

    def __init__(
        self,
        bootstrap_servers: str | None = None,
        *,
        topic_prefix: str = DEFAULT_TOPIC_PREFIX,
        partitions: int = 4,
        replication_factor: int | None = None,
        client_id: str = "orchestrator-kafka",
        security_protocol: str = "PLAINTEXT",
        sasl_mechanism: str | None = None,
        sasl_plain_username: str | None = None,
        sasl_plain_password: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        linger_ms: int = 2,
        max_poll_interval_ms: int = 300_000,
        session_timeout_ms: int = 10_000,
        fetch_max_wait_ms: int = _FETCH_MAX_WAIT_MS,
        start_timeout: float = 30.0,
    ) -> None:
        if partitions < 1 or (replication_factor is not None and replication_factor < 1):
            raise ValidationError("partitions and replication_factor must be at least 1")
        if start_timeout <= 0:
            raise ValidationError("start_timeout must be positive")
        if fetch_max_wait_ms < 0:
            raise ValidationError("fetch_max_wait_ms must not be negative")
        if security_protocol not in _SECURITY_PROTOCOLS:
            raise ValidationError(f"security_protocol must be one of {_SECURITY_PROTOCOLS}")
        if security_protocol.endswith("SSL") and ssl_context is None:
            raise ValidationError(f"security_protocol {security_protocol} needs an ssl_context")
        mechanism = sasl_mechanism or "PLAIN"
        if security_protocol.startswith("SASL"):
            if mechanism not in _SASL_MECHANISMS:
                raise ValidationError(f"sasl_mechanism must be one of {_SASL_MECHANISMS}")
            if mechanism == "PLAIN" and (sasl_plain_username is None or sasl_plain_password is None):
                raise ValidationError("SASL PLAIN needs sasl_plain_username and sasl_plain_password")

        self.bootstrap_servers: str = bootstrap_servers or os.environ.get(
            ENV_BOOTSTRAP_SERVERS, DEFAULT_BOOTSTRAP_SERVERS
        )
        self.topic_prefix = topic_prefix
        self.partitions = partitions
        self.replication_factor = replication_factor
        self.client_id = client_id
        self._linger_ms = linger_ms
        self._max_poll_interval_ms = max_poll_interval_ms
        self._session_timeout_ms = session_timeout_ms
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self._start_timeout = start_timeout
        self._common: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": security_protocol,
            "sasl_mechanism": mechanism,
            "sasl_plain_username": sasl_plain_username,
            "sasl_plain_password": sasl_plain_password,
            "ssl_context": ssl_context,
        }
        self._lifecycle = asyncio.Lock()
        self._publisher = Publisher(
            self._make_producer, timeout=start_timeout, lifecycle=self._lifecycle, linger=linger_ms / 1000
        )
        self._topics = TopicAdmin(
            partitions=partitions, replication_factor=replication_factor, timeout=start_timeout
        )
        self._subscriptions: set[KafkaSubscription | KafkaMessageSubscription] = set()
        self._watches: set[KafkaWatch] = set()

    @property
    def _producer(self) -> Any:
        """The shared aiokafka producer (the publisher's) while started, else None."""
        return self._publisher.producer

    @property
    def _admin(self) -> Any:
        """The aiokafka admin client while started, else None."""
        return self._topics.client

    # ---------------------------------------------------------------- lifecycle

    @property
    def started(self) -> bool:
        """True between a successful :meth:`start` and :meth:`stop`."""
        return self._producer is not None

    async def start(self) -> None:
        """Connect the shared producer and the admin client; idempotent.

        Raises:
            EventBusError: the brokers could not be reached within ``start_timeout``; nothing is left
                running.
        """
        async with self._lifecycle:
            if self._producer is not None:
                return
            producer: Any = None
            admin: Any = None
            ok = False
            try:
                async with asyncio.timeout(self._start_timeout):
                    producer = self._make_producer()
                    admin = AIOKafkaAdminClient(client_id=f"{self.client_id}-admin", **self._common)
                    await producer.start()
                    await admin.start()
                ok = True
            except (TimeoutError, KafkaError, OSError) as exc:
                # aiokafka raises KafkaConnectionError("Unable to bootstrap from [...]") on refusal
                # but may wait far longer (request_timeout_ms, 40 s) on a black hole: hence the
                # timeout and one clear error naming the servers.
                reason = (
                    f"no answer within {self._start_timeout:g}s" if isinstance(exc, TimeoutError) else exc
                )
                raise EventBusError(
                    f"cannot connect to Kafka at {self.bootstrap_servers!r}: {reason}"
                ) from exc
            finally:
                if not ok:
                    if producer is not None:
                        await quietly("producer stop", producer.stop(), self._start_timeout)
                    if admin is not None:
                        await quietly("admin close", admin.close(), self._start_timeout)
            self._publisher.producer = producer
            self._topics.client = admin

    def _make_producer(self) -> Any:
        """A new (not started) shared producer: idempotent, ``acks=all``, batches capped as publish
        builds them."""
        return AIOKafkaProducer(
            client_id=f"{self.client_id}-producer",
            acks="all",
            enable_idempotence=True,
            linger_ms=self._linger_ms,
            max_batch_size=MAX_BATCH_BYTES,
            max_request_size=MAX_REQUEST_BYTES,
            compression_type=None,
            **self._common,
        )

    async def stop(self) -> None:
        """Stop every subscription, flush and stop the producer, close the admin client; idempotent.
        The bus may be started again afterwards."""
        async with self._lifecycle:
            subscriptions: list[Subscription] = [*self._subscriptions, *self._watches]
            if subscriptions:
                await asyncio.gather(*(sub.stop() for sub in subscriptions), return_exceptions=True)
            self._subscriptions.clear()
            producer, admin = self._producer, self._admin
            self._publisher.producer = self._topics.client = None
            if producer is not None:
                # Flushes what is queued; bounded so a dead broker cannot hang stop().
                await quietly("producer stop", producer.stop(), self._start_timeout)
            if admin is not None:
                await quietly("admin close", admin.close(), self._start_timeout)

    def _require_started(self) -> None:
        if self._producer is None:
            raise EventBusError("the Kafka event bus is not started; call start() first")

    # ---------------------------------------------------------------- topics

    async def ensure_topics(self, topics: Sequence[str]) -> None:
        """Create the topics that do not exist yet (``partitions`` x ``replication_factor``) and wait
        until their partitions have leaders. Topics seen before cost nothing. If the credentials may not
        create topics, existing topics are assumed to be managed by the operator.

        Raises:
            EventBusError: not started, or the broker refused to create a topic.
        """
        self._require_started()
        await self._topics.ensure(topics)

    async def partition_count(self, topic: str) -> int | None:
        """How many partitions ``topic`` has, from the producer's metadata (fetched if not known yet).

        Raises:
            EventBusError: not started, or no metadata for the topic.
        """
        self._require_started()
        try:
            partitions = await self._producer.partitions_for(topic)
        except (KafkaError, OSError) as exc:
            raise EventBusError(f"no metadata for topic {topic!r}: {exc!r}") from exc
        return len(partitions)

    # ---------------------------------------------------------------- publish

    async def publish(self, messages: Sequence[OutboxMessage]) -> None:
        """Publish ``messages`` (keyed, with their headers) and return once every one is acknowledged by
        the brokers (``acks=all``, idempotent producer). Topics not seen before are created.

        The records are appended to one batch per (topic, partition), plus another whenever one is full
        (256 KB), and the batches are handed to the producer together and their deliveries awaited
        together, so a call costs about one round trip and 4-8 us of CPU a message. A key's partition is
        the one aiokafka's and the Java client's default partitioner choose (murmur2 of the key modulo
        the partition count), so other clients' messages with the same key land on the same partition.
        Messages of one key keep their order.

        Raises:
            EventBusError: not started; a message over the 1 MB limit or not made of bytes (then nothing
                of the call is published); or any message could not be published (the others may have
                been: publishing again is safe for at-least-once consumers). The error names the topics.
        """
        producer = self._producer
        if producer is None:
            raise EventBusError("the Kafka event bus is not started; call start() first")
        if not messages:
            return
        known = self._topics.known
        if any(m.topic not in known for m in messages):
            await self.ensure_topics([m.topic for m in messages])
        await self._publisher.publish(producer, messages)

    # ---------------------------------------------------------------- subscribe

    async def subscribe(
        self,
        topics: Sequence[str],
        group: str,
        handler: BatchHandler,
        *,
        max_batch: int = 500,
    ) -> Subscription:
        """Consume ``topics`` as a member of consumer group ``group`` (created first if missing).

        Returns once the member has its partition assignment; a new group starts at the earliest offset,
        so a message published after this returns is never missed. ``handler`` gets batches of at most
        ``max_batch`` messages across partitions. A batch's offsets are committed only after it returns,
        in the background while the next batch runs (batches handled during a commit are merged into the
        next one), and settled before a rebalance or ``stop``. A batch it raises on is not committed and
        is redelivered after a backoff (0.1 s doubling to 5 s).

        Raises:
            ValidationError: no topics, or ``max_batch`` < 1.
            EventBusError: not started, topics could not be created, or no assignment within
                ``start_timeout``.
        """
        self._require_started()
        if not topics:
            raise ValidationError("subscribe needs at least one topic")
        if max_batch < 1:
            raise ValidationError("max_batch must be at least 1")
        await self.ensure_topics(topics)
        sub = KafkaSubscription(
            self._member(group),
            topics,
            group,
            handler,
            max_batch=max_batch,
            stop_grace=self._start_timeout,
            revoke_wait=self._max_poll_interval_ms / 1000,
            on_stopped=self._subscriptions.discard,
        )
        await sub._start(self._start_timeout)
        return await self._started_member(sub)

    async def consume(
        self,
        topics: Sequence[str],
        group: str,
        handler: MessageHandler,
        *,
        concurrency: int,
        grace: float = 30.0,
    ) -> Subscription:
        """Consume ``topics`` as a member of consumer group ``group`` (created first if missing), each
        message in a slot of its own; see :meth:`IEventBus.consume`. With every slot taken the member
        pauses its partitions and keeps polling, so the group keeps it. A revocation waits for the
        revoked partitions' handlers (up to ``grace``, itself bounded by ``max_poll_interval_ms``, which
        is the group's rebalance timeout) and commits before the partitions move.

        Raises:
            ValidationError: no topics, ``concurrency`` < 1 or ``grace`` < 0.
            EventBusError: not started, topics could not be created, or no assignment within
                ``start_timeout``.
        """
        self._require_started()
        if not topics:
            raise ValidationError("consume needs at least one topic")
        if concurrency < 1:
            raise ValidationError("concurrency must be at least 1")
        if grace < 0:
            raise ValidationError("grace must not be negative")
        await self.ensure_topics(topics)
        sub = KafkaMessageSubscription(
            self._member(group),
            topics,
            group,
            handler,
            concurrency=concurrency,
            grace=grace,
            stop_limit=self._start_timeout,
            read_committed=functools.partial(self._read_committed, group),
            on_stopped=self._subscriptions.discard,
        )
        await sub._start(self._start_timeout)
        return await self._started_member(sub)

    async def _read_committed(self, group: str, partitions: list[Any]) -> dict[Any, Any]:
        """``group``'s committed offsets and metadata of ``partitions`` (aiokafka's consumer only tells the
        offset)."""
        admin = self._admin
        if admin is None:
            return {}
        async with asyncio.timeout(self._start_timeout):
            committed: dict[Any, Any] = await admin.list_consumer_group_offsets(group, partitions=partitions)
        return committed

    def _member(self, group: str) -> Any:
        """A new consumer for a member of ``group``."""
        return self._consumer(
            "consumer",
            group_id=group,
            max_poll_interval_ms=self._max_poll_interval_ms,
            session_timeout_ms=self._session_timeout_ms,
            # aiokafka defaults the rebalance timeout to the session timeout; the Java client (and
            # the meaning of max_poll_interval) give a member in the middle of a batch that long.
            rebalance_timeout_ms=self._max_poll_interval_ms,
            heartbeat_interval_ms=max(100, self._session_timeout_ms // 3),
        )

    async def _started_member(
        self, sub: KafkaSubscription | KafkaMessageSubscription
    ) -> KafkaSubscription | KafkaMessageSubscription:
        if self._producer is None:
            # stop() ran while this member was joining: it must not outlive the bus.
            await sub.stop()
            raise EventBusError("the Kafka event bus was stopped while subscribing")
        self._subscriptions.add(sub)
        return sub

    def _consumer(self, role: str, **settings: Any) -> Any:
        """An aiokafka consumer of this bus: manual commits, new groups from the earliest offset."""
        return AIOKafkaConsumer(
            client_id=f"{self.client_id}-{role}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=self.fetch_max_wait_ms,
            **settings,
            **self._common,
        )

    async def watch(self, topic: str, handler: WatchHandler) -> Watch:
        """Hand ``handler`` each message published to ``topic`` from now on, read by a consumer of its
        own outside any group (nothing is committed). Returns once the consumer sits at the end of every
        partition; ends when stopped or when the bus stops.

        Raises:
            EventBusError: not started, the broker unreachable, or no such topic.
        """
        self._require_started()
        watch = KafkaWatch(
            self._consumer("watch", group_id=None),
            topic,
            handler,
            limit=self._start_timeout,
            servers=self.bootstrap_servers,
            on_stopped=self._watches.discard,
        )
        await watch._start(self._admin)
        self._watches.add(watch)
        if self._producer is None:  # stop() ran while the watch started: it must not outlive the bus
            await watch.stop()
            raise EventBusError("the Kafka event bus was stopped while watching")
        return watch

    async def read(self, topic: str, *, follow: bool = False) -> AsyncIterator[InboundMessage]:
        """Every message kept on ``topic``, from the earliest offset of each partition, by a consumer of
        its own outside any group (nothing is committed); with ``follow``, then new messages as they
        arrive. Without it, the read ends at the end offsets the partitions had when it began.

        Raises:
            EventBusError: not started, the broker unreachable, or no such topic.
        """
        self._require_started()
        consumer = self._consumer("reader", group_id=None)
        messages = read_topic(
            consumer,
            self._admin,
            topic,
            follow=follow,
            limit=self._start_timeout,
            servers=self.bootstrap_servers,
        )
        # Closing this generator closes the read's, which stops its consumer.
        async with contextlib.aclosing(messages):
            async for message in messages:
                yield message
