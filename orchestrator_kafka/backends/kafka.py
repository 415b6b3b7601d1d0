"""The Kafka event bus: :class:`KafkaEventBus`, an :class:`~orchestrator_kafka.ports.IEventBus` on aiokafka.

What it promises (DESIGN sections 5 and 7):

* ``publish`` builds one record batch per (topic, partition) itself (aiokafka's ``create_batch`` /
  ``send_batch``: ~6 us of CPU a message instead of ~30 with one ``send`` each), choosing partitions
  exactly as aiokafka's and the Java client's default partitioner do (murmur2 of the key, cached per
  key), hands them to one shared idempotent producer (``acks=all``) and awaits every delivery together;
  it returns only once all are acknowledged.
* ``subscribe`` returns only once the consumer has its partitions assigned, and a new group starts from
  the earliest offset, so a message published after it returns is never missed.
* A subscriber's handler gets whole ``getmany`` batches; their offsets are committed once per batch,
  only after the handler returns. When it raises, nothing is committed, the batch's partitions are sought
  back to the batch's first offsets and the batch is redelivered after a backoff (at-least-once).
* A handler may return the batch's completion (see ``BatchHandler``): the next batches are fetched and
  handed over while it runs, and the batch is committed once it finishes, in order. When a completion
  raises, no later batch is committed either; once everything in flight has settled, each partition is
  sought back to the earliest offset of a failed batch.
* A batch's commit runs while the next batch is fetched and handled: one commit in flight at a time,
  the batches handled meanwhile merged into the next one, all settled before a rebalance gives the
  partitions away and before ``stop`` returns. The broker's commit round trip (~7 ms on Kafka 4.x, whose
  group coordinator lingers to batch writes) stays off the critical path.

aiokafka ships no type stubs, so its objects are ``Any`` here and never leak out of this module.
Headers pass through untouched both ways: the telemetry module puts W3C ``traceparent`` in them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    ConsumerStoppedError,
    IllegalStateError,
    KafkaError,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
    for_code,
)
from aiokafka.partitioner import DefaultPartitioner

from ..constants import DEFAULT_BOOTSTRAP_SERVERS, DEFAULT_TOPIC_PREFIX, ENV_BOOTSTRAP_SERVERS
from ..errors import EventBusError, ValidationError
from ..ports import BatchHandler, IEventBus, InboundMessage, OutboxMessage, Subscription, finished

__all__ = ["KafkaEventBus", "KafkaSubscription"]

_log = logging.getLogger("orchestrator_kafka.kafka")

# Backoff before redelivering a batch whose handler raised: short enough that a transient failure
# (a Redis blip) costs little, capped so a poison batch does not spin the CPU or flood the log.
_BACKOFF_START = 0.1
_BACKOFF_MAX = 5.0
# How long one getmany waits for records. Stopping cancels the wait, so this only bounds idle loops.
_POLL_TIMEOUT_MS = 1000
# Default of the fetch_max_wait_ms argument: how long the broker may hold a fetch with nothing new. aiokafka
# keeps one fetch in flight per broker, built from the partitions with nothing buffered. When those are
# caught up the broker holds the fetch that long, and a partition that still had buffered records (a
# backlog larger than max_batch) is not fetched again until it returns: its next records wait that long.
# The default 500 ms made 20,000-message runs bimodal (24k vs 45k msg/s); 100 ms bounds the stall and
# costs an idle consumer 10 empty fetches a second.
_FETCH_MAX_WAIT_MS = 100
# Record batch cap, for the batches publish builds and for aiokafka's own. A 500-message publish of
# 300 B messages fits in one batch per partition; 256 KB stays well under the broker's 1 MB
# message.max.bytes.
_MAX_BATCH_BYTES = 256 * 1024
# The largest record the producer accepts, as aiokafka's max_request_size (whose default it is): a
# record batch holding just that record must fit. The broker's own limit (message.max.bytes, 1 MB +
# 12 B by default) is a little larger.
_MAX_REQUEST_BYTES = 1024 * 1024
# Bytes a v2 record batch adds around its records (aiokafka's DefaultRecordBatchBuilder.HEADER_STRUCT).
_BATCH_OVERHEAD = 61
# Keys whose partition is remembered, per partition layout: a transaction id repeats over a saga's
# messages and murmur2 in pure Python costs ~20 us a key. Cleared when full (bounded memory).
_PARTITION_CACHE_SIZE = 65_536
# Poll interval while waiting for a new topic's partitions to get leaders.
_LEADER_POLL = 0.05

_SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
_SASL_MECHANISMS = ("PLAIN", "GSSAPI", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER")


class KafkaSubscription(Subscription):
    """One consumer-group member running a batch handler; made by :meth:`KafkaEventBus.subscribe`."""

    def __init__(
        self,
        consumer: Any,
        topics: Sequence[str],
        group: str,
        handler: BatchHandler,
        *,
        max_batch: int,
        stop_grace: float,
        revoke_wait: float,
        on_stopped: Callable[[KafkaSubscription], None],
    ) -> None:
        self._consumer = consumer
        self.topics: tuple[str, ...] = tuple(topics)
        self.group = group
        self._handler = handler
        self._max_batch = max_batch
        self._stop_grace = stop_grace
        self._revoke_wait = revoke_wait
        self._on_stopped = on_stopped
        self._task: asyncio.Task[None] | None = None
        self._stop_task: asyncio.Future[None] | None = None
        self._stopping = False
        # True while the loop waits (poll or backoff): only then may stop() cancel it without
        # cutting a batch in half.
        self._cancellable = False
        # Set when no batch is in hand; the revocation callback waits on it so the batch's commit
        # lands before its partitions move to another member (fewer duplicates after a rebalance).
        self._idle = asyncio.Event()
        self._idle.set()
        # Offsets of handled batches not yet sent, and the task committing them while the next
        # batches are fetched and handled.
        self._to_commit: dict[Any, int] = {}
        self._commit_task: asyncio.Task[None] | None = None
        # Handled batches whose completion (see BatchHandler) has not finished yet, oldest first: each
        # with its first and next offset per partition. The finisher task awaits them in order and
        # passes their offsets on to the commit loop.
        self._inflight: collections.deque[tuple[dict[Any, tuple[int, int]], Awaitable[None] | None]] = (
            collections.deque()
        )
        self._finisher: asyncio.Task[None] | None = None
        # After a batch failed (its handler or its completion raised): the offset each partition must be
        # sought back to. Nothing handled after the failure is committed; the loop rewinds once every
        # batch in flight has settled.
        self._rewind_to: dict[Any, int] = {}
        self._broken = False  # a completion failed: the batches behind it are not committed either
        self._backoff = _BACKOFF_START  # before redelivering after a failure; doubles up to _BACKOFF_MAX
        self._assigned = asyncio.Event()

    @property
    def assignment(self) -> frozenset[tuple[str, int]]:
        """The ``(topic, partition)`` pairs this member owns right now."""
        return frozenset((tp.topic, tp.partition) for tp in self._consumer.assignment())

    async def _start(self, wait: float) -> None:
        # Starts the consumer, joins the group and waits for the first assignment; on any failure
        # the consumer is stopped again so nothing is left running.
        ok = False
        try:
            async with asyncio.timeout(wait):
                await self._consumer.start()
                self._consumer.subscribe(topics=list(self.topics), listener=_Listener(self))
                await self._assigned.wait()
            self._task = asyncio.create_task(self._run(), name=f"kafka-subscription[{self.group}]")
            ok = True
        except TimeoutError as exc:
            raise EventBusError(
                f"consumer group {self.group!r} got no partition assignment for {list(self.topics)} "
                f"within {wait:g}s"
            ) from exc
        except (KafkaError, OSError) as exc:
            raise EventBusError(f"consumer group {self.group!r} could not start: {exc!r}") from exc
        finally:
            if not ok:
                await _stop_consumer(self._consumer, wait)

    async def stop(self) -> None:
        """Stop consuming after the batch in hand, then leave the group; idempotent and safe to call
        concurrently. A batch still running after the grace period (the bus's ``start_timeout``) is
        cancelled uncommitted, so it is redelivered to the group."""
        if self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self._shutdown())
        # Shielded so a cancelled caller does not leave the consumer half-closed.
        await asyncio.shield(self._stop_task)

    async def _shutdown(self) -> None:
        self._stopping = True
        task = self._task
        if task is not None and not task.done():
            if self._cancellable:
                task.cancel()
            done, _ = await asyncio.wait({task}, timeout=self._stop_grace)
            if not done:
                _log.warning(
                    "group %s: batch still running %.1fs after stop; cancelling it (it will be redelivered)",
                    self.group,
                    self._stop_grace,
                )
                task.cancel()
                await asyncio.wait({task})
        # The last handled batch's commit must land before the member leaves the group.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._stop_grace):
                await self._settle()
        # Bounded: aiokafka's close waits for its coordination task, which can sit in a JoinGroup (up to
        # the rebalance timeout) or wait for a coordinator forever while the broker is down.
        await _stop_consumer(self._consumer, self._stop_grace)
        self._on_stopped(self)

    async def _run(self) -> None:
        consumer = self._consumer
        while not self._stopping:
            if self._rewind_to:
                # A batch failed: let everything in flight settle, go back to the earliest offset not
                # committed, and wait before trying again.
                await self._settle_inflight()
                self._rewind()
                await self._pause()
                continue
            self._cancellable = True
            try:
                records: dict[Any, list[Any]] = await consumer.getmany(
                    timeout_ms=_POLL_TIMEOUT_MS, max_records=self._max_batch
                )
            except ConsumerStoppedError:
                return
            except Exception:  # noqa: BLE001 - a consumer that dies silently is the worst outcome
                # Connection loss is retried inside aiokafka and never gets here; what does is
                # e.g. an authorization or record-size error. Keep going, slowly.
                _log.exception("group %s: fetch failed; retrying in %.1fs", self.group, self._backoff)
                await self._pause()
                continue
            finally:
                self._cancellable = False
            if not records:
                continue
            if self._rewind_to:
                # A batch failed meanwhile: these records come again after the rewind, theirs included.
                self._failed(_offsets(records))
                continue
            self._idle.clear()
            try:
                await self._handle(records)
            finally:
                self._idle.set()

    async def _pause(self) -> None:
        """Sleep the backoff (cancellable by stop), then double it; a committed batch resets it."""
        if self._stopping:
            return
        self._cancellable = True
        try:
            await asyncio.sleep(self._backoff)
        finally:
            self._cancellable = False
        self._backoff = min(self._backoff * 2, _BACKOFF_MAX)

    async def _handle(self, records: dict[Any, list[Any]]) -> None:
        """Run the handler on one batch and queue its commit, or mark it for redelivery."""
        batch = [
            InboundMessage(r.topic, r.partition, r.offset, r.key, r.value, tuple(r.headers))
            for recs in records.values()
            for r in recs
        ]
        offsets = _offsets(records)
        if self._a_completion_failed():
            # The handler never sees a batch between a failure and the rewind: whatever it would do
            # with it would come before the redelivered batches it follows.
            self._failed(offsets)
            return
        try:
            completion = await self._handler(batch)
        except Exception:  # noqa: BLE001 - a failing handler gets its batch again
            _log.exception(
                "group %s: handler failed on a batch of %d messages; redelivering it", self.group, len(batch)
            )
            self._failed(offsets)
            return
        if completion is None and not self._inflight and not self._rewind_to:
            self._commit(offsets)
        else:
            # Behind a completion still running, even a batch done at once waits its turn: offsets are
            # committed in order.
            self._inflight.append((offsets, completion))
            if self._finisher is None:
                self._finisher = asyncio.create_task(self._finish())

    def _a_completion_failed(self) -> bool:
        """True from a failure (a completion that raised, even one the finisher has not reached yet)
        until the loop has rewound."""
        return bool(self._rewind_to) or any(
            isinstance(c, asyncio.Future) and c.done() and (c.cancelled() or c.exception() is not None)
            for _, c in self._inflight
        )

    async def _finish(self) -> None:
        """Await the completions in flight in order; commit each batch whose completion finished, and
        none after one that failed."""
        try:
            while self._inflight:
                offsets, completion = self._inflight[0]
                ok = True
                if completion is not None:
                    try:
                        await finished(completion)
                    except Exception:  # noqa: BLE001 - a failed completion gets its batch again
                        if not self._broken:
                            _log.exception(
                                "group %s: a batch's completion failed; redelivering from it", self.group
                            )
                        ok = False
                ok = ok and not self._broken  # nothing after a failed batch is committed
                self._inflight.popleft()
                if ok:
                    self._commit(offsets)
                else:
                    self._broken = True
                    self._failed(offsets)
        finally:
            self._finisher = None

    def _commit(self, offsets: dict[Any, tuple[int, int]]) -> None:
        self._backoff = _BACKOFF_START
        for tp, (_, end) in offsets.items():
            self._to_commit[tp] = end
        if self._commit_task is None:
            self._commit_task = asyncio.create_task(self._commit_loop())

    def _failed(self, offsets: dict[Any, tuple[int, int]]) -> None:
        for tp, (first, _) in offsets.items():
            self._rewind_to[tp] = min(first, self._rewind_to.get(tp, first))

    async def _commit_loop(self) -> None:
        # One commit in flight at a time, so committed offsets only move forward; the batches handled
        # meanwhile are merged into the next commit (latest offset per partition).
        try:
            while self._to_commit:
                offsets, self._to_commit = self._to_commit, {}
                # Only owned partitions: aiokafka refuses the whole commit if one is not assigned.
                owned = self._consumer.assignment()
                offsets = {tp: o for tp, o in offsets.items() if tp in owned}
                if not offsets:
                    continue
                try:
                    await self._consumer.commit(offsets)
                except (KafkaError, OSError) as exc:
                    # CommitFailedError after a rebalance: the partitions' new owner starts from the
                    # last committed offset and sees these messages again (at-least-once).
                    _log.warning("group %s: commit of %s failed: %r", self.group, offsets, exc)
        finally:
            self._commit_task = None

    async def _settle_inflight(self) -> None:
        """Wait until every batch in flight has finished (committed or marked for redelivery)."""
        while self._finisher is not None:
            await asyncio.shield(self._finisher)

    async def _settle(self) -> None:
        """Wait until every handled batch is settled and its commit attempted (failures are logged)."""
        await self._settle_inflight()
        while self._commit_task is not None:
            await asyncio.shield(self._commit_task)

    def _rewind(self) -> None:
        # Seek each partition back to the earliest offset of a batch that failed, dropping anything
        # prefetched after it, so the next getmany returns those messages again.
        rewind, self._rewind_to = self._rewind_to, {}
        self._broken = False
        for tp, offset in rewind.items():
            # A partition revoked meanwhile cannot be sought: its new owner reads from the committed
            # offset anyway.
            with contextlib.suppress(IllegalStateError):
                self._consumer.seek(tp, offset)


def _offsets(records: dict[Any, list[Any]]) -> dict[Any, tuple[int, int]]:
    """A fetched batch's first offset and the offset after its last, per partition."""
    return {tp: (recs[0].offset, recs[-1].offset + 1) for tp, recs in records.items()}


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka's ABC is untyped
    def __init__(self, subscription: KafkaSubscription) -> None:
        self._sub = subscription

    async def on_partitions_revoked(self, revoked: set[Any]) -> None:
        # aiokafka awaits this before re-joining, while the generation is still valid: waiting for
        # the batch in hand and its commit lets the commit succeed instead of failing with
        # CommitFailedError after the partitions have moved (which would mean duplicates).
        if not revoked:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._sub._revoke_wait):
                await self._sub._idle.wait()
                await self._sub._settle()

    async def on_partitions_assigned(self, assigned: set[Any]) -> None:
        _log.debug("group %s: assigned %s", self._sub.group, sorted(map(str, assigned)))
        self._sub._assigned.set()


class KafkaEventBus(IEventBus):
    """An :class:`IEventBus` on Apache Kafka through aiokafka.

    ``bootstrap_servers`` None means ``$KAFKA_BOOTSTRAP_SERVERS`` or ``localhost:9092``. New topics get
    ``partitions`` partitions and ``replication_factor`` replicas. The security settings go to the
    producer, every consumer and the admin client alike. ``start_timeout`` bounds connecting, waiting for
    a partition assignment, and how long ``stop`` waits for a batch in hand.

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
        replication_factor: int = 1,
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
        if partitions < 1 or replication_factor < 1:
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
        self._producer: Any = None
        self._admin: Any = None
        self._lifecycle = asyncio.Lock()
        self._topics_lock = asyncio.Lock()
        self._known_topics: set[str] = set()
        self._subscriptions: set[KafkaSubscription] = set()
        # Partition of each recently published key, per partition layout (see _TopicPlan).
        self._partition_caches: dict[tuple[int, ...], dict[str, int]] = {}
        # Per (topic, partition): serialises handing batches to the producer (see _send_batches).
        self._enqueue_locks: dict[tuple[str, int], asyncio.Lock] = {}

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
                        await _quietly("producer stop", producer.stop(), self._start_timeout)
                    if admin is not None:
                        await _quietly("admin close", admin.close(), self._start_timeout)
            self._producer = producer
            self._admin = admin

    def _make_producer(self) -> Any:
        return AIOKafkaProducer(
            client_id=f"{self.client_id}-producer",
            acks="all",
            enable_idempotence=True,
            linger_ms=self._linger_ms,
            max_batch_size=_MAX_BATCH_BYTES,
            max_request_size=_MAX_REQUEST_BYTES,
            compression_type=None,
            **self._common,
        )

    async def _replace_producer(self, dead: Any) -> Any:
        """Swap a dead producer for a new one; the producer to use (the dead one if the new one cannot
        start yet: the next publish tries again).

        aiokafka's idempotent producer dies for good on some errors (OutOfOrderSequenceNumber after a
        rejected batch, aio-libs/aiokafka#1017): its sender task ends and every later send raises the
        same error. Only a new producer (a new producer id) publishes again.
        """
        async with self._lifecycle:
            if self._producer is not dead:  # replaced meanwhile, or the bus was stopped
                return self._producer if self._producer is not None else dead
            task = dead._sender.sender_task
            reason = task.exception() if task.done() and not task.cancelled() else None
            _log.warning("the Kafka producer died (%r); starting a new one", reason)
            fresh = self._make_producer()
            try:
                async with asyncio.timeout(self._start_timeout):
                    await fresh.start()
            except (TimeoutError, KafkaError, OSError) as exc:
                _log.warning("could not start a new Kafka producer yet: %r", exc)
                await _quietly("new producer stop", fresh.stop(), self._start_timeout)
                return dead
            self._producer = fresh
            await _quietly("dead producer stop", dead.stop(), self._start_timeout)
            return fresh

    async def stop(self) -> None:
        """Stop every subscription, flush and stop the producer, close the admin client; idempotent.
        The bus may be started again afterwards."""
        async with self._lifecycle:
            subscriptions = list(self._subscriptions)
            if subscriptions:
                await asyncio.gather(*(sub.stop() for sub in subscriptions), return_exceptions=True)
            self._subscriptions.clear()
            producer, admin = self._producer, self._admin
            self._producer = self._admin = None
            if producer is not None:
                # Flushes what is queued; bounded so a dead broker cannot hang stop().
                await _quietly("producer stop", producer.stop(), self._start_timeout)
            if admin is not None:
                await _quietly("admin close", admin.close(), self._start_timeout)

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
        if all(t in self._known_topics for t in topics):
            return
        async with self._topics_lock:
            missing = sorted({t for t in topics if t not in self._known_topics})
            if not missing:
                return
            try:
                present = await self._create_topics(missing)
                if present:
                    await self._wait_for_leaders(present)
            except (KafkaError, OSError) as exc:
                raise EventBusError(f"could not create topics {missing}: {exc!r}") from exc
            self._known_topics.update(missing)

    async def _create_topics(self, names: list[str]) -> list[str]:
        """Issue one CreateTopics request; the names created now or already there. A topic "already
        there" may have been created by another client an instant ago, so its leaders are awaited too;
        topics this client may not create are left out (the operator manages them)."""
        new = [NewTopic(n, self.partitions, self.replication_factor) for n in names]
        response = await self._admin.create_topics(new, timeout_ms=int(self._start_timeout * 1000))
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
        # joining then would be assigned none of the topic's partitions, and a producer would wait.
        try:
            async with asyncio.timeout(self._start_timeout):
                while True:
                    described = await self._admin.describe_topics(names)
                    if _all_led(described, names):
                        return
                    await asyncio.sleep(_LEADER_POLL)
        except TimeoutError as exc:
            raise EventBusError(
                f"topics {names} got no partition leaders within {self._start_timeout:g}s"
            ) from exc

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
        known = self._known_topics
        if any(m.topic not in known for m in messages):
            await self.ensure_topics([m.topic for m in messages])
        if _dead(producer):
            producer = await self._replace_producer(producer)
        plans = await self._build_batches(producer, messages)
        try:
            await self._send_batches(producer, plans, len(messages))
        except EventBusError:
            if _dead(producer):
                await self._replace_producer(producer)  # for the caller's retry
            raise

    async def _build_batches(self, producer: Any, messages: Sequence[OutboxMessage]) -> dict[str, _TopicPlan]:
        """Append every message to its partition's batches; nothing is sent yet. This loop is the hot
        path: one dict lookup for the topic, one for the key's partition, one C-level append."""
        plans: dict[str, _TopicPlan] = {}
        create_batch = producer.create_batch
        index = 0
        topic = ""
        try:
            for index, m in enumerate(messages):
                topic = m.topic
                plan = plans.get(topic)
                if plan is None:
                    plan = plans[topic] = await self._plan(producer, topic)
                key = m.key
                partition = plan.cache.get(key)
                if partition is None:
                    partition = plan.choose(key)
                key_bytes = key.encode()
                # aiokafka's C batch builder takes headers as a list only.
                headers = list(m.headers)
                batches = plan.batches.get(partition)
                if (
                    batches is None
                    or batches[-1].append(timestamp=None, key=key_bytes, value=m.value, headers=headers)
                    is None
                ):
                    # No batch for this partition yet, or it is full: start another. Its first record
                    # always fits, however large, so the size limit is checked here.
                    batch = create_batch()
                    record = batch.append(timestamp=None, key=key_bytes, value=m.value, headers=headers)
                    size = _BATCH_OVERHEAD + (record.size if record is not None else 0)
                    if record is None or size > _MAX_REQUEST_BYTES:
                        raise EventBusError(
                            f"message {index} of {len(messages)} (topic {topic!r}, key {key!r}) is {size:,} "
                            f"bytes as a record batch, over the {_MAX_REQUEST_BYTES:,}-byte limit; nothing "
                            "of this call was published"
                        )
                    if batches is None:
                        plan.batches[partition] = [batch]
                    else:
                        batches.append(batch)
        except (ValueError, TypeError) as exc:
            # A value or header value that is not bytes, a header name that is not a str.
            raise EventBusError(
                f"message {index} of {len(messages)} (topic {topic!r}) cannot be encoded: {exc!r}; nothing "
                "of this call was published"
            ) from exc
        return plans

    async def _plan(self, producer: Any, topic: str) -> _TopicPlan:
        """The partitions of ``topic`` from the producer's metadata (fetched if not known yet)."""
        cluster = producer.client.cluster
        partitions = cluster.partitions_for_topic(topic)
        if partitions is None:
            try:
                partitions = await producer.partitions_for(topic)
            except (KafkaError, OSError) as exc:
                raise EventBusError(f"no metadata for topic {topic!r}: {exc!r}") from exc
        all_partitions = tuple(sorted(partitions))
        # The choice depends on the key and the partition list only, so topics with the same layout share
        # one cache: a transaction id is hashed once for all the topics it is published to.
        cache = self._partition_caches.get(all_partitions)
        if cache is None:
            if len(self._partition_caches) >= 16:  # layouts only change when topics are repartitioned
                self._partition_caches.clear()
            cache = self._partition_caches[all_partitions] = {}
        available = sorted(cluster.available_partitions_for_topic(topic) or ())
        return _TopicPlan(all_partitions, available, cache)

    async def _send_batches(self, producer: Any, plans: dict[str, _TopicPlan], total: int) -> None:
        """Hand the batches to the producer and await their deliveries together."""
        # First batches of every partition, then the second ones, ...: a partition's next batch is only
        # accepted once its previous one left for the broker, so this order lets the first batches of
        # every partition share one produce request. A partition's batches go in order.
        queues = [(topic, p, batches) for topic, plan in plans.items() for p, batches in plan.batches.items()]
        rounds = max(len(batches) for _, _, batches in queues)
        futures: list[asyncio.Future[Any]] = []
        sent: list[tuple[str, int]] = []
        for r in range(rounds):
            for topic, partition, batches in queues:
                if r >= len(batches):
                    continue
                batch = batches[r]
                batch.close()  # nothing else may be appended once it is queued
                where = (topic, partition)
                lock = self._enqueue_locks.get(where)
                if lock is None:
                    lock = self._enqueue_locks[where] = asyncio.Lock()
                try:
                    # One caller at a time per partition, first come first served. aiokafka's add_batch
                    # lets a batch wait while the partition has one queued, and takes the *total* time
                    # waited off its timeout after every wake-up: with a few hundred concurrent publish
                    # calls (a service starting sagas per request) the waits add up quadratically and
                    # the later calls fail with KafkaTimeoutError after a second or so of real waiting.
                    # Behind this lock, a batch waits for at most the one queued before it.
                    async with lock:
                        futures.append(await producer.send_batch(batch, topic, partition=partition))
                except (KafkaError, OSError) as exc:
                    # Retrieve the queued deliveries so none is left with an unobserved exception.
                    await asyncio.gather(*futures, return_exceptions=True)
                    raise EventBusError(
                        f"could not queue a batch of {batch.record_count()} messages for topic {topic!r} "
                        f"partition {partition} ({sum(n for _, n in sent)} of {total} messages were "
                        f"queued): {exc!r}"
                    ) from exc
                sent.append((topic, batch.record_count()))
        results = await asyncio.gather(*futures, return_exceptions=True)
        failed = [(where, r) for where, r in zip(sent, results, strict=True) if isinstance(r, BaseException)]
        if failed:
            lost = sum(n for (_, n), _ in failed)
            topics = ", ".join(sorted({t for (t, _), _ in failed}))
            first = failed[0][1]
            raise EventBusError(
                f"{lost} of {total} messages were not published to topic(s) {topics}: {first!r}"
            ) from first

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
        consumer = self._consumer(
            "consumer",
            group_id=group,
            max_poll_interval_ms=self._max_poll_interval_ms,
            session_timeout_ms=self._session_timeout_ms,
            # aiokafka defaults the rebalance timeout to the session timeout; the Java client (and
            # the meaning of max_poll_interval) give a member in the middle of a batch that long.
            rebalance_timeout_ms=self._max_poll_interval_ms,
            heartbeat_interval_ms=max(100, self._session_timeout_ms // 3),
        )
        sub = KafkaSubscription(
            consumer,
            topics,
            group,
            handler,
            max_batch=max_batch,
            stop_grace=self._start_timeout,
            revoke_wait=self._max_poll_interval_ms / 1000,
            on_stopped=self._subscriptions.discard,
        )
        await sub._start(self._start_timeout)
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

    async def read(self, topic: str, *, follow: bool = False) -> AsyncIterator[InboundMessage]:
        """Every message kept on ``topic``, from the earliest offset of each partition, by a consumer of
        its own outside any group (nothing is committed); with ``follow``, then new messages as they
        arrive. Without it, the read ends at the end offsets the partitions had when it began.

        Raises:
            EventBusError: not started, the broker unreachable, or no such topic.
        """
        self._require_started()
        consumer = self._consumer("reader", group_id=None)
        try:
            try:
                async with asyncio.timeout(self._start_timeout):
                    [described] = await self._admin.describe_topics([topic])
                    await consumer.start()
            except (KafkaError, OSError, TimeoutError) as exc:
                raise EventBusError(f"cannot read {topic!r} from {self.bootstrap_servers}: {exc!r}") from exc
            if described["error_code"] != 0 or not described["partitions"]:
                raise EventBusError(f"no topic {topic!r} on {self.bootstrap_servers}")
            try:
                numbers = sorted(p["partition"] for p in described["partitions"])
                partitions = [TopicPartition(topic, p) for p in numbers]
                consumer.assign(partitions)
                await consumer.seek_to_beginning(*partitions)
                ends: dict[Any, int] = {}
                if not follow:
                    begins = await consumer.beginning_offsets(partitions)
                    ends = await consumer.end_offsets(partitions)
                    ends = {tp: end for tp, end in ends.items() if end > begins[tp]}  # the non-empty ones
                while follow or ends:
                    records = await consumer.getmany(*partitions, timeout_ms=500)
                    for tp, recs in records.items():
                        end = ends.get(tp)
                        for r in recs:
                            if not follow and (end is None or r.offset >= end):
                                break
                            headers = tuple(r.headers)
                            yield InboundMessage(r.topic, r.partition, r.offset, r.key, r.value, headers)
                        if end is not None and recs and recs[-1].offset >= end - 1:
                            del ends[tp]
            except (KafkaError, OSError) as exc:
                where = self.bootstrap_servers
                raise EventBusError(f"reading {topic!r} from {where} failed: {exc!r}") from exc
        finally:
            await _stop_consumer(consumer, self._start_timeout)


_PARTITIONER = DefaultPartitioner()


class _TopicPlan:
    """One topic's part of a publish call: its partitions, the shared key -> partition cache for that
    partition layout, and the record batches being filled per partition (in order)."""

    __slots__ = ("all_partitions", "available", "batches", "cache")

    def __init__(self, all_partitions: tuple[int, ...], available: list[int], cache: dict[str, int]) -> None:
        self.all_partitions = all_partitions
        self.available = available
        self.cache = cache
        self.batches: dict[int, list[Any]] = {}

    def choose(self, key: str) -> int:
        """The partition aiokafka's DefaultPartitioner picks for ``key`` (murmur2 as in the Java client),
        remembered: murmur2 in pure Python costs ~20 us a key."""
        cache = self.cache
        if len(cache) >= _PARTITION_CACHE_SIZE:
            cache.clear()
        partition: int = _PARTITIONER(key.encode(), list(self.all_partitions), self.available)
        cache[key] = partition
        return partition


def _dead(producer: Any) -> bool:
    """True when an aiokafka producer's sender task has ended: it will never deliver again."""
    task = getattr(getattr(producer, "_sender", None), "sender_task", None)
    return task is not None and task.done()


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


async def _stop_consumer(consumer: Any, limit: float) -> None:
    """Stop an aiokafka consumer, bounded, and finish the job when aiokafka gives up half-way."""
    try:
        await _quietly("consumer stop", consumer.stop(), limit)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # a real cancellation of the caller
        # aiokafka bug (aio-libs/aiokafka#647, #983): Fetcher.close() awaits its cancelled fetch tasks
        # without suppressing CancelledError, so with the broker down (a task sleeping in its retry
        # backoff) consumer.stop() raises CancelledError into a caller nobody cancelled and skips
        # closing the remaining tasks and the connections. Close them here (private attributes, so
        # looked up defensively).
        _log.debug("aiokafka consumer.stop() leaked a CancelledError; finishing the close")
        fetcher = getattr(consumer, "_fetcher", None)
        pending = list(getattr(fetcher, "_pending_tasks", ()))
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        client = getattr(consumer, "_client", None)
        if client is not None:
            await _quietly("consumer client close", client.close(), limit)


async def _quietly(what: str, awaitable: Any, limit: float) -> None:
    # Tearing down must not mask the error that caused it, nor stop the rest of the teardown, nor hang.
    try:
        async with asyncio.timeout(limit):
            await awaitable
    except TimeoutError:
        _log.warning("%s did not finish within %gs; abandoned", what, limit)
    except (KafkaError, OSError, RuntimeError) as exc:
        _log.warning("%s failed: %r", what, exc)
