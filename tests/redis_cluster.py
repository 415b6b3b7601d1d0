"""A Redis Cluster for the tests: six redis-servers of a test session's own (three primaries, each with a
replica) on loopback ports from 7100 up, made with ``redis-cli --cluster create``, or the cluster named by
``CLUSTER_REDIS_URL`` when it is set (a shared one: then nothing is started, and the tests that kill or
stop nodes get a private cluster all the same, never the shared one).

The private cluster has a short ``cluster-node-timeout`` (2 s), so a primary killed is replaced by its
replica within a few seconds, and no persistence. A missing ``redis-server`` or ``redis-cli`` binary
fails the test: never a skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ENV_CLUSTER_URL = "CLUSTER_REDIS_URL"
BASES = range(7100, 7200, 10)  # six ports from each base: 7100-7105, else 7110-7115, ...
NODE_TIMEOUT_MS = 2000


def _free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as redis-server binds
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _ask(port: int, *command: str, timeout: float = 1.0) -> str | None:
    """``redis-cli -p port command...``'s output, None when the node does not answer."""
    try:
        done = subprocess.run(
            ["redis-cli", "-p", str(port), *command], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return None
    return done.stdout if done.returncode == 0 and not done.stdout.startswith("Could not connect") else None


def _info(port: int, section: str) -> dict[str, str]:
    text = _ask(port, "INFO", section) or ""
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


@dataclass
class Cluster:
    """A Redis Cluster to test on: ``url`` names one of its nodes. ``private``: started by this session,
    so its nodes may be stopped and killed (:attr:`processes` by port)."""

    url: str
    ports: list[int]
    private: bool
    workdir: Path | None = None
    processes: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    def node_url(self, port: int) -> str:
        return f"redis://127.0.0.1:{port}/0"

    def role(self, port: int) -> str:
        return _info(port, "replication").get("role", "")

    def primaries(self) -> list[int]:
        return [p for p in self.ports if self.alive(p) and self.role(p) == "master"]

    def replicas_of(self, primary: int) -> list[int]:
        """The ports of ``primary``'s replicas that are in sync."""
        info = _info(primary, "replication")
        found = []
        for key, value in info.items():
            if key.startswith("slave") and key[5:].isdigit():
                fields = dict(item.split("=", 1) for item in value.split(","))
                if fields.get("state") == "online":
                    found.append(int(fields["port"]))
        return found

    def alive(self, port: int) -> bool:
        process = self.processes.get(port)
        return (process is None or process.poll() is None) and _ask(port, "PING", timeout=0.5) is not None

    # ------------------------------------------------------------ faults (a private cluster's only)

    def _pid(self, port: int) -> int:
        assert self.private, "faults are only made on a private cluster"
        return self.processes[port].pid

    def pause(self, port: int) -> None:
        os.kill(self._pid(port), signal.SIGSTOP)

    def resume(self, port: int) -> None:
        os.kill(self._pid(port), signal.SIGCONT)

    def kill(self, port: int) -> None:
        process = self.processes[port]
        os.kill(self._pid(port), signal.SIGKILL)
        process.wait()

    def restart(self, port: int) -> None:
        """Start a killed node again on its own nodes.conf: it rejoins the cluster (as a replica, if
        its replica was promoted meanwhile)."""
        assert self.workdir is not None
        self.processes[port] = _start(port, self.workdir)
        _wait(lambda: self.alive(port), f"node {port} to answer")

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until every node answers, the cluster is ok on each, and every primary has a replica in sync."""

        def healthy() -> bool:
            if not all(self.alive(p) for p in self.ports):
                return False
            if any("cluster_state:ok" not in (_ask(p, "CLUSTER", "INFO") or "") for p in self.ports):
                return False
            primaries = self.primaries()
            return len(primaries) == 3 and all(self.replicas_of(p) for p in primaries) and self._acks()

        _wait(healthy, "the cluster to be ok with a replica per primary", timeout)

    def _acks(self) -> bool:
        """Whether a write to each primary is acknowledged by its replica at once (WAIT 1 on the
        connection of the write): a replica listed as in sync may still be loading what it was sent."""
        import redis
        from redis.cluster import RedisCluster

        try:
            client = RedisCluster(host="127.0.0.1", port=self.ports[0], socket_timeout=2.0)
        except redis.RedisError:
            return False
        try:
            probed: set[str] = set()
            for n in range(1000):
                key = f"wait-probe:{n}"
                node = client.get_node_from_key(key)
                if node is None or node.name in probed:
                    continue
                probed.add(node.name)
                pipe = node.redis_connection.pipeline(transaction=False)
                pipe.set(key, b"1").execute_command("WAIT", 1, 500)
                if pipe.execute()[1] < 1:
                    return False
                if len(probed) == 3:
                    return True
            return False
        except redis.RedisError:
            return False
        finally:
            client.close()


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def _start(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server): these tests need it")
    options = {
        "port": str(port),
        "bind": "127.0.0.1",
        "cluster-enabled": "yes",
        "cluster-config-file": f"nodes-{port}.conf",
        "cluster-node-timeout": str(NODE_TIMEOUT_MS),
        "save": "",
        "appendonly": "no",
        "repl-diskless-sync-delay": "0",  # a replica syncs at once, not after 5 s
        "maxmemory-policy": "noeviction",
        "dir": str(workdir),
        "daemonize": "no",
        "loglevel": "warning",
        "logfile": str(workdir / f"redis-{port}.log"),
    }
    return subprocess.Popen(
        [binary, *(arg for name, value in options.items() for arg in (f"--{name}", value))],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@contextmanager
def private_cluster() -> Iterator[Cluster]:
    """Start a six-node cluster (three primaries with a replica each) in a temporary directory; stop
    it at the end."""
    if shutil.which("redis-cli") is None:
        pytest.fail("redis-cli is not installed (apt-get install redis-tools): these tests need it")
    base = next((b for b in BASES if all(_free(b + i) and _free(b + i + 10000) for i in range(6))), None)
    if base is None:
        pytest.fail(f"no six free ports for a private Redis Cluster from {BASES.start} to {BASES.stop}")
    ports = list(range(base, base + 6))
    with tempfile.TemporaryDirectory(prefix="private-cluster-") as tmp:
        workdir = Path(tmp)
        cluster = Cluster(f"redis://127.0.0.1:{base}/0", ports, True, workdir)
        try:
            for port in ports:
                cluster.processes[port] = _start(port, workdir)
            _wait(lambda: all(cluster.alive(p) for p in ports), "the cluster's nodes to answer", 10)
            made = subprocess.run(
                [
                    "redis-cli",
                    "--cluster",
                    "create",
                    *(f"127.0.0.1:{p}" for p in ports),
                    "--cluster-replicas",
                    "1",
                    "--cluster-yes",
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            if made.returncode != 0:
                pytest.fail(f"redis-cli --cluster create failed: {made.stdout}{made.stderr}")
            cluster.wait_healthy()
            yield cluster
        finally:
            for process in cluster.processes.values():
                if process.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(process.pid, signal.SIGCONT)  # a paused node would not stop
                    process.terminate()
            for process in cluster.processes.values():
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def shared_cluster() -> Cluster | None:
    """The cluster ``CLUSTER_REDIS_URL`` names, or None when it is not set."""
    url = os.environ.get(ENV_CLUSTER_URL, "").strip()
    if not url:
        return None
    from urllib.parse import urlparse

    first = urlparse(url.split(",")[0].strip())
    port = first.port or 6379
    if _ask(port, "PING") is None and first.hostname in ("127.0.0.1", "localhost"):
        pytest.fail(f"the Redis Cluster at {ENV_CLUSTER_URL}={url} does not answer")
    return Cluster(url, [port], False)
