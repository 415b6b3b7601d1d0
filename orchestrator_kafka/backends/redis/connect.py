"""How the Redis state store reaches Redis: one server, or a Redis Cluster through redis-py's cluster
client, told apart by asking the server (:func:`connect`).

Start-up nodes come from a URL, a comma-separated list of URLs (``redis://a:7000,redis://b:7001``, or
``redis://a:7000,b:7001``) and ``startup_nodes``; any node of a cluster will do, and the first that
answers is the one asked, so a client starting while a node is down still connects.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast
from urllib.parse import urlparse

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from ...errors import StateStoreError, ValidationError

__all__ = ["FAILURES", "Client", "Target", "close_client", "connect", "is_cluster", "parse_target", "refresh"]

_log = logging.getLogger("orchestrator_kafka.redis")

Client = aioredis.Redis | RedisCluster
"""A client the store works through: one server's, or a cluster's."""

FAILURES: Final = (RedisError, RedisClusterException, OSError)
"""What a Redis client raises when Redis fails or cannot be reached. redis-py's cluster client raises
RedisClusterException (not a RedisError) when no node answers or the slots are not all covered."""

# A store of its own making fails fast on a dead Redis: 5 s to connect, 10 s per reply.
_TIMEOUTS: Final[dict[str, Any]] = {"socket_connect_timeout": 5.0, "socket_timeout": 10.0}


@dataclass(frozen=True, slots=True)
class Target:
    """Where Redis is: ``urls``, the first one's settings (database, credentials, TLS) for every node."""

    urls: tuple[str, ...]

    @property
    def nodes(self) -> list[tuple[str, int]]:
        """Each start-up node's host and port."""
        found = []
        for url in self.urls:
            parsed = urlparse(url)
            found.append((parsed.hostname or "localhost", parsed.port or 6379))
        return found


def parse_target(url: str, startup_nodes: Sequence[str] = ()) -> Target:
    """The start-up nodes of ``url`` (one URL, or several separated by commas; a bare ``host:port``
    after the first takes the first one's scheme) and ``startup_nodes`` (URLs or ``host:port``).

    Raises:
        ValidationError: no node is named, or one is not a ``redis://`` or ``rediss://`` URL.
    """
    items = [part.strip() for part in url.split(",") if part.strip()]
    items += [str(node).strip() for node in startup_nodes if str(node).strip()]
    if not items:
        raise ValidationError("no Redis URL given")
    scheme = urlparse(items[0]).scheme if "://" in items[0] else "redis"
    urls = []
    for item in items:
        full = item if "://" in item else f"{scheme}://{item}"
        parsed = urlparse(full)
        if parsed.scheme not in ("redis", "rediss") or not parsed.hostname:
            raise ValidationError(f"not a Redis URL: {item!r} (redis://host:port/db, or host:port)")
        try:
            parsed.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            raise ValidationError(f"not a Redis URL: {item!r}: the port is not a number") from None
        urls.append(full)
    return Target(tuple(urls))


def is_cluster(client: Client) -> bool:
    """True for redis-py's cluster client."""
    return isinstance(client, RedisCluster)


def server_client(url: str) -> aioredis.Redis:
    """A client of the one server at ``url``, as the store makes it."""
    return aioredis.Redis.from_url(
        url,
        **_TIMEOUTS,
        health_check_interval=30,
        # One retry on a dropped connection only: a timeout is not retried (a dead Redis must fail
        # fast). Re-sending a script whose reply was lost is safe: its applied writes come back as
        # duplicates (their event ids are recorded), acks are idempotent, and timers a lost claim
        # leased fire again when the lease ends.
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 1, (RedisConnectionError,)),
    )


def cluster_client(target: Target) -> RedisCluster:
    """redis-py's cluster client on ``target``'s nodes (the first URL's credentials and TLS for all).
    It maps the slots from the first start-up node that answers, and follows the cluster from then on
    (failovers, MOVED)."""
    first = urlparse(target.urls[0])
    if first.path not in ("", "/", "/0"):
        raise ValidationError(f"a Redis Cluster has database 0 only, not {first.path[1:]!r}")
    nodes = [ClusterNode(host, port) for host, port in target.nodes]
    return RedisCluster(
        startup_nodes=nodes,
        username=first.username or None,
        password=first.password or None,
        ssl=first.scheme == "rediss",
        **_TIMEOUTS,
    )


async def _cluster_enabled(url: str) -> bool:
    """Whether the server at ``url`` runs in cluster mode (``INFO cluster``: ``cluster_enabled:1``).

    Raises:
        RedisError, OSError: the server did not answer.
    """
    probe = aioredis.Redis.from_url(url, **_TIMEOUTS)
    try:
        info = await cast("Callable[..., Awaitable[Any]]", probe.info)("cluster")
    finally:
        await probe.aclose()
    return str(info.get("cluster_enabled", 0)) == "1"


async def connect(target: Target, cluster: bool | None, made: aioredis.Redis | None) -> Client:
    """The client for ``target``: a cluster client when ``cluster`` is True, or when it is None and the
    first start-up node that answers says it runs in cluster mode; else ``made`` (a client of the first
    URL's server, made beforehand) when that server answered, else a client of the first that did (the
    caller closes ``made`` when it is not returned).

    Raises:
        StateStoreError: ``cluster`` is None and no start-up node answers.
        ValidationError: a cluster is named with a database other than 0.
    """
    answered = target.urls[0]
    if cluster is None:
        failures = []
        last: Exception | None = None
        for url in target.urls:
            try:
                cluster = await _cluster_enabled(url)
            except ResponseError:  # INFO refused (an ACL): not a cluster to be found out this way
                cluster = False
            except FAILURES as exc:
                failures.append(f"{urlparse(url).netloc}: {type(exc).__name__}: {exc}")
                last = exc
                continue
            answered = url
            break
        else:
            raise StateStoreError(
                "Redis state store: no start-up node answered: " + "; ".join(failures)
            ) from last
    if cluster:
        return cluster_client(target)
    if made is not None and answered == target.urls[0]:
        return made
    return server_client(answered)


# redis-py 7.4's cluster client maps each slot to the node objects of the reading of the slot map that
# made it, not to the ones it keeps by name (and closes on aclose): a node object a new reading drops
# keeps its sockets open, and they are only found (unclosed) by the garbage collector. So the store
# closes the dropped ones itself, after each reading it asks for, and the last ones on close.


def _slot_nodes(client: RedisCluster) -> dict[int, ClusterNode]:
    manager = client.nodes_manager
    found = {id(node): node for nodes in manager.slots_cache.values() for node in nodes}
    for node in (*manager.nodes_cache.values(), *manager.startup_nodes.values()):
        found[id(node)] = node
    return found


async def _disconnect(nodes: list[ClusterNode]) -> None:
    await asyncio.gather(*(node.disconnect() for node in nodes), return_exceptions=True)


async def refresh(client: RedisCluster) -> None:
    """Read the cluster's slot map again, as after a failover or a MOVED (best effort: a caller that
    failed fails all the same), and close the node objects the new map dropped."""
    before = _slot_nodes(client)
    try:
        await client.nodes_manager.initialize()
    except FAILURES as exc:
        _log.debug("could not read the Redis Cluster's slot map again: %s", exc)
    after = _slot_nodes(client)
    await _disconnect([node for key, node in before.items() if key not in after])


async def close_client(client: Client) -> None:
    """Close ``client``: on a cluster, every node object its slot map holds too.

    Raises:
        RedisError, OSError: closing failed.
    """
    if isinstance(client, RedisCluster):
        await _disconnect(list(_slot_nodes(client).values()))
    await client.aclose()
