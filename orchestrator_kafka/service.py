"""Running an orchestrator or a worker as a process: signals, health endpoints, orderly shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence

from .lifecycle import Service

_log = logging.getLogger(__name__)
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RepeatFilter(logging.Filter):
    """Lets a log line of the client libraries (``aiokafka``, ``redis``) with the same template from the
    same logger through at most once per ``interval`` seconds, then says how many it held back. While a
    broker is down aiokafka logs a connection error per client per retry: tens of thousands of lines a
    minute that would bury everything else. The project's own lines (a dead letter each) all pass."""

    _LIBRARIES = ("aiokafka", "redis")

    def __init__(self, interval: float = 10.0) -> None:
        super().__init__()
        self._interval = interval
        self._last: dict[tuple[str, object], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self._LIBRARIES):
            return True
        key = (record.name, record.msg)
        seen = self._last.get(key)
        if seen is not None and record.created - seen[0] < self._interval:
            self._last[key] = (seen[0], seen[1] + 1)
            return False
        if seen is not None and seen[1]:
            record.msg = f"{record.msg} (and {seen[1]} more like it in the last {self._interval:g}s)"
        if len(self._last) > 10_000:
            self._last.clear()
        self._last[key] = (record.created, 0)
        return True


# Python collects its youngest generation every 700 net allocations. An orchestrator or worker allocates
# tens of objects per event and keeps thousands of sagas cached, so at that pace the collector took a
# quarter to a third of an orchestrator's CPU in the benchmark (BENCHMARKS.md). Its garbage is nearly
# all freed by reference counting; the collector is only for the rare cycle.
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """Collect cyclic garbage less often (:data:`GC_THRESHOLDS`), for a process that runs an orchestrator
    or a worker. ``serve`` (the ``run`` and ``worker`` commands) calls it; an application that embeds
    either may call it at start-up. It changes the whole process's collector."""
    gc.set_threshold(*GC_THRESHOLDS)


class HealthServer:
    """Plain HTTP for probes: ``GET /healthz`` answers 200 while the event loop runs; ``GET /readyz``
    answers 200 while the service is started and not stopping and ``problem`` returns None, else 503
    with the reason (e.g. the state store refuses writes). Anything else is a 404."""

    def __init__(
        self,
        host: str,
        port: int,
        ready: Callable[[], bool],
        problem: Callable[[], str | None] = lambda: None,
    ) -> None:
        self._host, self._port, self._ready, self._problem = host, port, ready, problem
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The port listened on (the one asked for, or the one picked for port 0)."""
        assert self._server is not None, "not started"
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Listen; raises OSError when the port is taken."""
        self._server = await asyncio.start_server(self._answer, self._host, self._port)
        _log.info("health endpoints on http://%s:%d/healthz and /readyz", self._host, self.port)

    async def stop(self) -> None:
        """Stop listening; idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    def _readiness(self) -> tuple[str, str]:
        if not self._ready():
            return "503 Service Unavailable", "not ready"
        # Not ready while it cannot make progress: a load balancer or an operator sees why, while the
        # liveness probe stays green (a restart would not give Redis its memory back).
        problem = self._problem()
        if problem is not None:
            return "503 Service Unavailable", f"not ready: {problem}"
        return "200 OK", "ready"

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request = await reader.readline()
                while (await reader.readline()).strip():  # the headers, unused
                    pass
            parts = request.split()
            path = parts[1].decode("latin-1") if len(parts) > 1 else ""
            if path == "/healthz":
                status, body = "200 OK", "ok"
            elif path == "/readyz":
                status, body = self._readiness()
            else:
                status, body = "404 Not Found", "not found"
            data = body.encode()
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
                + data
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def serve(
    service: Service,
    *,
    closers: Sequence[Callable[[], Awaitable[None]]] = (),
    health: tuple[str, int] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Start ``service``, run until SIGTERM or SIGINT (or ``stop`` is set), then stop it and run
    ``closers`` (the bus's and the store's close), in order. ``health`` = (host, port) serves the
    probes of :class:`HealthServer` for as long as the process runs.

    The stop is graceful: the batches in hand finish and are committed, and the consumers leave their
    groups, so the partitions move to the other instances at once.
    """
    tune_gc()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in _STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    ready = False
    probes = HealthServer(health[0], health[1], lambda: ready, service.unready_reason) if health else None
    try:
        if probes is not None:
            await probes.start()
        await service.start()
        ready = True
        _log.info("%s running; SIGTERM or Ctrl-C stops it", type(service).__name__)
        await stop.wait()
        _log.info("stopping %s", type(service).__name__)
    finally:
        ready = False
        try:
            await service.stop()
        finally:
            for close in closers:
                await close()
            if probes is not None:
                await probes.stop()
            for sig in _STOP_SIGNALS:
                loop.remove_signal_handler(sig)
    _log.info("stopped")
