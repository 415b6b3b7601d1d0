"""Durability across failover: a write is written once ``min_replicas`` replicas have acknowledged it
(Redis ``WAIT``), and a short count is a failed write (:func:`write_and_wait`).

Why it is sound. ``WAIT n timeout`` blocks *its connection* until ``n`` replicas have acknowledged the
replication offset of that connection's last write (``c->woff``), and answers how many have. So:

* WAIT is sent on the very connection the script call went on, right behind it, in one round trip: the
  two are written to the socket together and Redis runs a connection's commands in order. redis-py's
  cluster client cannot promise that for two separate calls (each takes a free connection of the
  node, or routes a keyless WAIT to its default node, and its pipelines send a redirected command on
  alone), so on a cluster the two go on one connection of the node that owns the partition's slot,
  taken from that node's own pool; on one server, in a redis-py pipeline (one connection; a retried
  pipeline re-sends both).
* A script that wrote nothing (every write of the batch a duplicate: a redelivery, or a retry after a
  lost reply or a failed WAIT) does not move that connection's offset on Redis 7.2 and later, and its
  WAIT would then cover nothing, though the duplicates' outboxes are about to be published again. The
  earlier write that made them is in the same primary's replication stream, before any write made
  now; so one small write of a partition key of its own (the *barrier*) on the same connection, then
  WAIT, covers it.
* A slot that moved (MOVED, ASK: a failover or a resharding) refreshes the slot map and sends the pair
  again to the new owner; a NOSCRIPT loads the script on that connection first. Only a script reply
  and a WAIT from the same connection are ever taken together.

What it does not do: Redis stays asynchronous. A primary that dies after the script and before the
replicas have it loses the write; the caller then saw a failure and published nothing. A failover may
still promote a replica that lacks a write another replica had (WAIT counts any ``n``), and a network
partition can leave two primaries for a while (Jepsen's Redis analyses): not linearizable.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.client import NEVER_DECODE
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    ResponseError,
    TryAgainError,
)

from ...errors import NotReplicatedError, StateStoreError
from .connect import FAILURES, Client, refresh

__all__ = ["Replicas", "default_min_replicas", "load_everywhere"]

_log = logging.getLogger("orchestrator_kafka.redis")

_ATTEMPTS = 3  # a slot that moved, then a script to load: no more than this in one call

Command = tuple[str | bytes | int, ...]


class Replicas:
    """Writes that count once ``replicas`` replicas have them: :meth:`write_and_wait` on ``client``.

    On a cluster it keeps a client of its own per primary, to send a script call and its WAIT on one
    connection of the node that owns the slot (redis-py's cluster client has no public way to do
    that); :meth:`aclose` closes them.
    """

    def __init__(self, client: Client, replicas: int, timeout_ms: int) -> None:
        self.replicas = replicas
        self._client = client
        self._wait: Command = ("WAIT", replicas, timeout_ms)
        self._timeout_ms = timeout_ms
        self._nodes: dict[str, aioredis.Redis] = {}

    async def aclose(self) -> None:
        """Close the clients of the nodes."""
        nodes, self._nodes = list(self._nodes.values()), {}
        for node in nodes:
            await node.aclose()
            await node.connection_pool.disconnect()  # a pool passed in is the caller's to close

    def _of_node(self, node: ClusterNode) -> aioredis.Redis:
        made = self._nodes.get(node.name)
        if made is None:
            # The node's own connection settings (credentials, TLS, timeouts), as the cluster client
            # made them; no retry: a failed call fails, and the orchestrator retries the batch.
            pool = aioredis.ConnectionPool(connection_class=node.connection_class, **node.connection_kwargs)
            made = self._nodes[node.name] = aioredis.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0))
        return made

    async def _on_one_connection(self, slot_key: str, commands: Sequence[Command]) -> list[Any]:
        """Send ``commands`` together on one connection of the primary that holds ``slot_key``'s slot,
        in order (a redis-py pipeline: one connection, one round trip); each one's reply, bytes
        undecoded, or the error Redis answered it with.

        Raises:
            RedisError, OSError: the connection failed (on a cluster the slot map is read again, so
                that a call after a failover goes to the promoted replica).
        """
        client = self._client
        if isinstance(client, RedisCluster):
            await client.initialize()
            node = client.get_node_from_key(slot_key)
            if node is None:  # pragma: no cover - get_node_from_key raises for a slot not covered
                raise StateStoreError(f"Redis state store: no node holds the slot of {slot_key!r}")
            target = self._of_node(node)
        else:
            target = client
        pipe = target.pipeline(transaction=False)
        for args in commands:
            pipe.execute_command(*args, **{NEVER_DECODE: True})
        try:
            return list(await pipe.execute(raise_on_error=False))
        except FAILURES:
            if isinstance(client, RedisCluster):
                await refresh(client)
            raise

    async def write_and_wait(
        self,
        slot_key: str,
        script_call: Command,
        script: str,
        *,
        barrier_key: str,
        wrote: Callable[[Any], bool],
    ) -> Any:
        """Run ``script_call`` (an EVALSHA of ``script``, on ``slot_key``'s slot) and WAIT for the
        replicas on the same connection; its reply once they have acknowledged it. ``wrote(reply)``:
        the call made a write (else, a barrier write and WAIT follow, covering what an earlier call
        wrote).

        Raises:
            NotReplicatedError: fewer replicas acknowledged in time. The script's writes stand on the
                primary; retried, they come back as duplicates.
            ResponseError: the script failed (its error reply).
            RedisError, OSError: Redis failed or could not be reached; the slot kept moving.
        """
        client = self._client
        wait = self._wait
        load: tuple[Command, ...] = ()
        for _ in range(_ATTEMPTS):
            *_loaded, reply, acked = await self._on_one_connection(slot_key, (*load, script_call, wait))
            if isinstance(reply, NoScriptError):
                load = (("SCRIPT", "LOAD", script),)  # a node that never had it, or a promoted replica
                continue
            if isinstance(reply, (MovedError, AskError)) and isinstance(client, RedisCluster):
                await refresh(client)
                continue
            if isinstance(reply, (ClusterDownError, TryAgainError)) and isinstance(client, RedisCluster):
                await refresh(client)  # a failover under way: this call fails, the next finds the new owner
            if isinstance(reply, Exception):
                raise reply
            if not wrote(reply):
                _set, acked = await self._on_one_connection(slot_key, (("SET", barrier_key, b"1"), wait))
                if isinstance(_set, Exception):
                    raise _set
            if isinstance(acked, Exception):
                raise acked
            if int(acked) < self.replicas:
                raise NotReplicatedError(
                    f"Redis state store: the write was acknowledged by {int(acked)} of the {self.replicas} "
                    f"replicas it needs (min_replicas) within {self._timeout_ms} ms; it is not taken as "
                    "written"
                )
            return reply
        raise MovedError(f"the slot of {slot_key!r} kept moving, or the script could not be loaded")


async def default_min_replicas(client: Client) -> int:
    """1 when every primary has a replica connected (``INFO replication``: ``connected_slaves``), 0 when
    none has; with some but not all, 0 and a warning naming those without.

    Raises:
        RedisError, OSError: Redis failed.
    """
    counts: dict[str, int] = {}
    try:
        if isinstance(client, RedisCluster):
            await client.initialize()
            for node in client.get_primaries():
                info = await client.execute_command("INFO", "replication", target_nodes=node)
                counts[node.name] = int(info.get("connected_slaves", 0))
        else:
            info = await cast("Callable[..., Awaitable[Any]]", client.info)("replication")
            counts["the server"] = int(info.get("connected_slaves", 0))
    except ResponseError as exc:  # INFO refused (an ACL): nothing to go by
        _log.warning("cannot read Redis's replicas (%s): writes will not wait for any (min_replicas=0)", exc)
        return 0
    without = sorted(name for name, n in counts.items() if n == 0)
    if without and len(without) < len(counts):
        _log.warning(
            "Redis primaries without a replica: %s; writes will not wait for replicas (min_replicas=0): "
            "give every primary a replica, or pass min_replicas=1 to require one",
            ", ".join(without),
        )
    return 0 if without else 1


async def load_everywhere(client: Client, script: str) -> None:
    """Load ``script`` on every node of a cluster, replicas included (a promoted replica then has it);
    on one server, there. Best effort: a node that does not answer loads it on its first NOSCRIPT."""
    try:
        if isinstance(client, RedisCluster):
            await client.initialize()
            for node in client.get_nodes():
                try:
                    await client.execute_command("SCRIPT", "LOAD", script, target_nodes=node)
                except FAILURES as exc:
                    _log.debug("could not load the script on %s: %s", node.name, exc)
        else:
            await cast("Callable[..., Awaitable[Any]]", client.execute_command)("SCRIPT", "LOAD", script)
    except FAILURES as exc:
        _log.debug("could not load the script: %s", exc)
