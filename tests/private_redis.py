"""A redis-server of a test's own, with a small ``maxmemory`` and ``noeviction``, to fill up (issue 12,
"Redis full"): the shared test Redis must never be filled, other tests run on it.

The server runs on a free loopback port in 6390-6399, without persistence, and is stopped afterwards.
A missing ``redis-server`` binary fails the test (``scripts/services`` needs it too): never a skip.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import pytest
import redis.asyncio as aioredis
from redis.exceptions import OutOfMemoryError

PORTS = range(6390, 6400)
MAXMEMORY = 4 * 1024 * 1024
FILLER = "filler"
PIN_MARGIN = 64 * 1024  # far less than the filler keys free, far more than a connection's buffers


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextmanager
def private_redis(*, maxmemory: int = MAXMEMORY, policy: str = "noeviction") -> Iterator[str]:
    """Run a redis-server of its own; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server): these tests need it")
    with tempfile.TemporaryDirectory(prefix="private-redis-") as workdir:
        for port in PORTS:
            if not _free(port):
                continue
            options = {
                "port": str(port),
                "bind": "127.0.0.1",
                "save": "",  # no persistence: the server lives for one test
                "appendonly": "no",
                "maxmemory": str(maxmemory),
                "maxmemory-policy": policy,
                "dir": workdir,
                "daemonize": "no",
                "loglevel": "warning",
            }
            process = subprocess.Popen(
                [binary, *(arg for name, value in options.items() for arg in (f"--{name}", value))],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 5
            while process.poll() is None and not _answers(port) and time.monotonic() < deadline:
                time.sleep(0.02)
            if process.poll() is not None:
                continue  # another session took the port meanwhile: try the next
            if not _answers(port):
                process.kill()
                process.wait()
                pytest.fail(f"the private redis-server on port {port} did not answer within 5 s")
            try:
                yield f"redis://127.0.0.1:{port}/0"
            finally:
                process.terminate()
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            return
        pytest.fail(f"no free port for a private redis-server in {PORTS.start}-{PORTS.stop - 1}")


async def cmd(client: aioredis.Redis, *args: Any) -> Any:
    """A raw Redis command (redis-py's own method types do not say they are awaitable)."""
    return await cast("Callable[..., Awaitable[Any]]", client.execute_command)(*args)


async def fill(url: str) -> int:
    """Write filler keys until Redis refuses a write for memory; the number written. Then pin
    ``maxmemory`` a little below what is used: connection buffers freed afterwards (the filler's own
    query buffer, some kilobytes) would otherwise leave room for a small write, and a test that hopes
    for a refusal would be a coin toss. Deleting the filler keys (:func:`free`) makes room again."""
    client = aioredis.Redis.from_url(url)
    written = 0
    try:
        for size in (16_384, 1024, 64):
            try:
                while True:
                    await cmd(client, "SET", f"{FILLER}:{written}", b"x" * size)
                    written += 1
            except OutOfMemoryError:
                pass
        used = int((await client.info("memory"))["used_memory"])
        await cmd(client, "CONFIG", "SET", "maxmemory", str(used - PIN_MARGIN))
    finally:
        await client.aclose()
    return written


async def free(url: str) -> None:
    """Delete the filler keys: Redis has room again."""
    client = aioredis.Redis.from_url(url)
    try:
        async for key in client.scan_iter(match=f"{FILLER}:*", count=1000):
            await cmd(client, "UNLINK", key)
    finally:
        await client.aclose()
