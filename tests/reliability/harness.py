"""A world of orchestrator and worker processes on real Kafka and Redis, and the checks made after a fault.

:class:`World` starts ``orchestrator-kafka run`` (through ``launch.py``, which can install a crash hook)
and ``orchestrator-kafka worker`` as separate OS processes, submits sagas with :class:`SagaClient`, waits
for them to end and :meth:`World.verify` checks the promise:

* every started saga reached a final state, and started = completed + compensated + failed + cancelled;
* each command (saga, step, kind, attempt) ran in a handler once (``app.py`` records every invocation in
  a Redis no test restarts);
* a step whose execution succeeded in a saga that ended compensated or cancelled was compensated;
* each transition was applied once: the audit topic holds, per saga, exactly the versions 1..v where v is
  the saga's final version in Redis, and where a version appears more than once (an outbox re-published
  after a crash: at-least-once delivery) the copies are byte-identical;
* nothing went to the dead-letter topic (unless the test expects it), and no outbox is left unpublished.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from orchestrator_kafka import KafkaEventBus, RedisStateStore, SagaClient
from orchestrator_kafka.context import SagaContext
from orchestrator_kafka.models import command_id

from ..conftest import unique

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = Path(__file__).resolve().parent / "launch.py"
FINAL = ("completed", "compensated", "failed", "cancelled")
COMPENSATED_STEPS = {"reserve", "charge"}  # the steps of app.WORKFLOW that have a compensation
# Audit actions that one event causes, so each (action, step, kind, attempt) happens once per saga.
_ONCE = {"step_dispatched", "step_succeeded", "step_timed_out", "retry_scheduled", "step_failed"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
            return int(answer.status) == 200
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class Proc:
    """One service process; its output goes to a file (a pipe nobody reads would block it)."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    port: int

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    async def ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise AssertionError(f"{self.name} exited {self.popen.returncode}:\n{self.output()[-3000:]}")
            if await asyncio.to_thread(_ready, self.port):
                return
            await asyncio.sleep(0.2)
        raise AssertionError(f"{self.name} not ready within {timeout}s:\n{self.output()[-3000:]}")

    async def exited(self, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} still running after {timeout}s:\n{self.output()[-3000:]}")
            await asyncio.sleep(0.1)
        return int(self.popen.returncode)

    def kill9(self) -> None:
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            self.popen.wait(30)

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    async def terminate(self, timeout: float = 60) -> int:
        if self.alive():
            os.kill(self.pid, signal.SIGCONT)  # a stopped process cannot handle SIGTERM
            os.kill(self.pid, signal.SIGTERM)
        try:
            return await self.exited(timeout)
        except AssertionError:
            self.kill9()
            raise

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Report:
    """What :meth:`World.verify` found."""

    states: dict[str, int]
    runs: int
    transitions: int
    republished: int  # audit records seen more than once (identical copies)
    dead_letters: int


@dataclass
class World:
    bootstrap: str
    redis_url: str  # the saga state
    record_url: str  # where the handlers record their invocations; never restarted by a test
    logdir: Path
    partitions: int = 4
    redis_cluster: bool = False  # the saga state is on a Redis Cluster (redis_url names a node of it)
    # Not unique("t"): the session-end cleanup of any other pytest session on this broker deletes every
    # "t-..." topic, including those of a test still running here. close() deletes these topics.
    prefix: str = field(default_factory=lambda: unique("rel"))
    procs: list[Proc] = field(default_factory=list)
    _bus: KafkaEventBus | None = None
    _store: RedisStateStore | None = None
    _record: aioredis.Redis | None = None
    _submitted: int = 0

    # ------------------------------------------------------------ processes

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("REL_", "OTEL_"))}
        env.update(
            KAFKA_BOOTSTRAP_SERVERS=self.bootstrap,
            REDIS_URL=self.redis_url,
            ORCHESTRATOR_TOPIC_PREFIX=self.prefix,
            ORCHESTRATOR_KEY_PREFIX=self.prefix,
            ORCHESTRATOR_PARTITIONS=str(self.partitions),
            ORCHESTRATOR_LOG_LEVEL="INFO",
            REL_RECORD_URL=self.record_url,
            REL_RECORD_PREFIX=self.prefix,
            PYTHONPATH=str(ROOT),
        )
        env.update(extra)
        return env

    def _spawn(self, name: str, args: Sequence[str], env: dict[str, str]) -> Proc:
        port = free_port()
        log = self.logdir / f"{name}-{len(self.procs)}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                [*args, "--health-host", "127.0.0.1", "--health-port", str(port)],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        proc = Proc(name, popen, log, port)
        self.procs.append(proc)
        return proc

    def orchestrator(self, crash: str | None = None, **extra: str) -> Proc:
        env = self.env(**extra)
        if crash:
            env["REL_CRASH"] = crash
        return self._spawn(
            "orchestrator",
            [sys.executable, str(LAUNCH), "run", "--workflows", "tests.reliability.app"],
            env,
        )

    def worker(self, **extra: str) -> Proc:
        return self._spawn(
            "worker",
            [sys.executable, str(LAUNCH), "worker", "--handlers", "tests.reliability.app"],
            self.env(**extra),
        )

    async def up(self, orchestrators: int = 1, workers: int = 1, **extra: str) -> list[Proc]:
        procs = [self.orchestrator(**extra) for _ in range(orchestrators)]
        procs += [self.worker(**extra) for _ in range(workers)]
        await asyncio.gather(*(p.ready() for p in procs))
        return procs

    # ------------------------------------------------------------ clients

    @property
    def bus(self) -> KafkaEventBus:
        if self._bus is None:
            self._bus = KafkaEventBus(
                self.bootstrap, topic_prefix=self.prefix, partitions=self.partitions, start_timeout=60
            )
        return self._bus

    @property
    def store(self) -> RedisStateStore:
        if self._store is None:
            self._store = RedisStateStore(self.redis_url, key_prefix=self.prefix)
        return self._store

    @property
    def record(self) -> aioredis.Redis:
        if self._record is None:
            self._record = aioredis.from_url(self.record_url)
        return self._record

    async def submit(self, plans: Iterable[str], workflow: str = "rel") -> list[str]:
        """Start one saga per plan (through the start topic, as a service would); their ids."""
        await self.bus.start()
        client = SagaClient(self.bus, self.store)
        plans = list(plans)
        first, self._submitted = self._submitted, self._submitted + len(plans)
        ids = [f"{self.prefix}-{first + i:05d}-{plan}" for i, plan in enumerate(plans)]
        await asyncio.gather(
            *(
                client.start_saga(workflow, {"plan": plan}, transaction_id=tx)
                for tx, plan in zip(ids, plans, strict=True)
            )
        )
        return ids

    async def cancel(self, ids: Sequence[str]) -> int:
        """Ask for each saga to be cancelled (those not started yet or already ending are skipped)."""
        client = SagaClient(self.bus, self.store)
        asked = 0
        for tx in ids:
            try:
                await client.cancel_saga(tx)
                asked += 1
            except (ValueError, Exception):  # noqa: BLE001 - unknown yet, or too late: fine
                pass
        return asked

    async def sagas(self, ids: Sequence[str]) -> dict[str, SagaContext]:
        found: dict[str, SagaContext] = {}
        for i in range(0, len(ids), 500):
            found.update(await self.store.load_contexts(list(ids[i : i + 500])))
        return found

    async def command_ids(
        self, ids: Sequence[str], step: str, kind: str = "execute", attempt: int = 1
    ) -> set[str]:
        """The command ids of ``step``'s ``attempt`` in the sagas ``ids`` (each saga's run id in it)."""
        return {
            command_id(tx, step, kind, attempt, saga.run_id) for tx, saga in (await self.sagas(ids)).items()
        }  # type: ignore[arg-type]

    async def progress(self, ids: Sequence[str]) -> collections.Counter[str]:
        sagas = await self.sagas(ids)
        return collections.Counter(sagas[tx].state.value if tx in sagas else "missing" for tx in ids)

    async def wait_final(self, ids: Sequence[str], timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        counts: collections.Counter[str] = collections.Counter()
        while time.monotonic() < deadline:
            counts = await self.progress(ids)
            if sum(counts[s] for s in FINAL) == len(ids):
                return
            await asyncio.sleep(0.5)
        raise AssertionError(f"not every saga ended within {timeout}s: {dict(counts)}\n{self.tails()}")

    async def wait_outboxes_empty(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while await self.store.pending_outboxes(limit=10):
            if time.monotonic() > deadline:
                raise AssertionError(f"outboxes still pending after {timeout}s\n{self.tails()}")
            await asyncio.sleep(0.5)

    async def wait_progress(self, ids: Sequence[str], at_least: int, timeout: float = 60) -> None:
        """Until at least ``at_least`` sagas exist in Redis (so a fault lands in the middle of things)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            counts = await self.progress(ids)
            if len(ids) - counts["missing"] >= at_least:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"fewer than {at_least} sagas started within {timeout}s\n{self.tails()}")

    async def topic(self, name: str) -> list[Any]:
        await self.bus.start()
        return [m async for m in self.bus.read(name)]

    def tails(self) -> str:
        return "\n".join(f"--- {p.name} pid {p.pid}:\n{p.output()[-2000:]}" for p in self.procs)

    # ------------------------------------------------------------ the verdict

    async def verify(
        self,
        ids: Sequence[str],
        *,
        handlers_once: bool = True,
        dead_letters: int = 0,
        check_handlers: bool = True,
    ) -> Report:
        """Wait for every saga to end and every outbox to drain, then check the promise (module doc)."""
        await self.wait_final(ids)
        await self.wait_outboxes_empty()
        sagas = await self.sagas(ids)
        states = collections.Counter(s.state.value for s in sagas.values())
        assert len(sagas) == len(ids)
        assert sum(states[s] for s in FINAL) == len(ids), dict(states)

        runs_raw = await self.record.hgetall(f"{self.prefix}:runs")
        ok_raw = await self.record.hgetall(f"{self.prefix}:ok")
        runs = {k.decode(): int(v) for k, v in runs_raw.items()}
        ok = {k.decode() for k in ok_raw}
        if check_handlers:
            if handlers_once:
                twice = {cid: n for cid, n in runs.items() if n != 1}
                assert not twice, f"commands run more than once: {sorted(twice.items())[:20]}"
            by_step: dict[tuple[str, str, str], set[str]] = collections.defaultdict(set)
            for cid in runs:
                run, step, kind, attempt = cid.rsplit(":", 3)  # run: "<tx>:<run id>"
                by_step[run, step, kind].add(attempt)
            for tx, saga in sagas.items():
                state = saga.state.value
                if saga.workflow_id != "rel":
                    continue
                run = f"{tx}:{saga.run_id}"
                if state == "completed":
                    for step in ("reserve", "charge", "ship"):
                        assert any(
                            f"{run}:{step}:execute:{a}" in ok for a in by_step[run, step, "execute"]
                        ), f"{tx} completed without a successful {step}"
                if state in ("compensated", "cancelled"):
                    for step in COMPENSATED_STEPS:
                        succeeded = any(
                            f"{run}:{step}:execute:{a}" in ok for a in by_step[run, step, "execute"]
                        )
                        if succeeded:
                            assert by_step[run, step, "compensate"], f"{tx} {state}: {step} not compensated"

        audit: dict[str, dict[int, set[bytes]]] = collections.defaultdict(
            lambda: collections.defaultdict(set)
        )
        copies = 0
        for m in await self.topic(f"{self.prefix}.events"):
            event = orjson.loads(m.value)
            audit[event["transaction_id"]][event["body"]["version"]].add(m.value)
            copies += 1
        distinct = 0
        for tx, saga in sagas.items():
            versions = audit.get(tx, {})
            assert set(versions) == set(range(1, saga.version + 1)), (
                f"{tx}: audit versions {sorted(versions)} but the saga is at version {saga.version}"
            )
            seen: set[tuple[Any, ...]] = set()
            for version, contents in sorted(versions.items()):
                assert len(contents) == 1, f"{tx}: version {version} was applied {len(contents)} ways"
                # No event took effect twice: the same result taken, timer fired or state entered in two
                # transitions would repeat one of these actions.
                for action in orjson.loads(next(iter(contents)))["body"]["actions"]:
                    if action["action"] in _ONCE or action["step"] is None:
                        what = (action["action"], action["step"], action["kind"], action["attempt"])
                        assert what not in seen, f"{tx}: {what} twice (again at version {version})"
                        seen.add(what)
            distinct += len(versions)
        assert set(audit) <= set(sagas), (
            f"audit records of unknown sagas: {sorted(set(audit) - set(sagas))[:5]}"
        )

        dlq = await self.topic(f"{self.prefix}.dlq")
        if dead_letters >= 0:
            assert len(dlq) == dead_letters, [
                (dict(m.headers).get("dlq.reason"), (m.value or b"")[:80]) for m in dlq[:10]
            ]
        return Report(dict(states), sum(runs.values()), distinct, copies - distinct, len(dlq))

    # ------------------------------------------------------------ teardown

    async def _delete_topics(self) -> None:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        try:
            async with asyncio.timeout(30):
                await admin.start()
                mine = [t for t in await admin.list_topics() if t.startswith(f"{self.prefix}.")]
                if mine:
                    await admin.delete_topics(mine)
        except Exception:  # noqa: BLE001 - a private broker may be gone already
            pass
        finally:
            await admin.close()

    async def close(self) -> None:
        for proc in self.procs:
            proc.signal(signal.SIGCONT)
            proc.kill9()
        if self._bus is not None:
            await self._bus.stop()
        await self._delete_topics()
        keys_of = f"{self.prefix}:*"
        for url in {self.redis_url, self.record_url}:
            # On a Redis Cluster, SCAN goes to every primary and a pipeline splits the deletes by node.
            cluster = self.redis_cluster and url == self.redis_url
            client = RedisCluster.from_url(url) if cluster else aioredis.from_url(url)
            try:
                keys = [k async for k in client.scan_iter(match=keys_of, count=1000)]
                for i in range(0, len(keys), 1000):
                    pipe = client.pipeline()
                    for key in keys[i : i + 1000]:
                        pipe.delete(key)
                    await pipe.execute()
            except Exception:  # noqa: BLE001 - a private Redis may be gone already
                pass
            finally:
                await client.aclose()
        if self._store is not None:
            await self._store.close()
        if self._record is not None:
            await self._record.aclose()
