"""Fixtures of the multi-node tests (marker ``cluster``): the three-broker Kafka and the Redis Cluster that
``scripts/services up --cluster`` runs beside the single-node services (``scripts/test`` starts both).

They read ``CLUSTER_KAFKA_BOOTSTRAP_SERVERS`` and ``CLUSTER_REDIS_URL`` (scripts/test exports them from
``scripts/services env --cluster``), not ``KAFKA_BOOTSTRAP_SERVERS``/``REDIS_URL``, which stay the single
node's for every other test. A cluster that is not there, or not whole, FAILS the test: never a skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import delete_session_topics

CLUSTER_KAFKA = os.environ.get(
    "CLUSTER_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092,127.0.0.1:19093,127.0.0.1:19094"
)
CLUSTER_REDIS = os.environ.get("CLUSTER_REDIS_URL", "redis://127.0.0.1:7000")
BROKERS = len(CLUSTER_KAFKA.split(","))
SERVICES = Path(__file__).resolve().parents[2] / "scripts" / "services"


async def brokers_listed(bootstrap: str, timeout: float = 10.0) -> int:
    """How many brokers the cluster's metadata lists (0 when it cannot be reached in ``timeout``)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000))
    try:
        async with asyncio.timeout(timeout):
            await admin.start()
            return len((await admin.describe_cluster())["brokers"])
    except Exception:  # noqa: BLE001 - any failure means "not there"
        return 0
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


def require_cluster_kafka() -> str:
    """The cluster's bootstrap servers, once every broker is in the metadata; else the test fails."""
    listed = asyncio.run(brokers_listed(CLUSTER_KAFKA))
    if listed < BROKERS:
        pytest.fail(
            f"the {BROKERS}-broker Kafka at {CLUSTER_KAFKA} lists {listed} brokers: run"
            " 'scripts/services up --cluster' (or 'scripts/test')"
        )
    return CLUSTER_KAFKA


@pytest.fixture(scope="session")
def cluster_kafka() -> str:
    """The three-broker Kafka, checked once a session (the fault test brings it back whole)."""
    return require_cluster_kafka()


async def cluster_state(url: str, timeout: float = 5.0) -> str:
    """What the Redis Cluster node at ``url`` says of the cluster (``CLUSTER INFO``), or why not."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        info = await client.execute_command("CLUSTER", "INFO")
        return info.decode() if isinstance(info, bytes) else str(info)
    except Exception as exc:  # noqa: BLE001 - any failure means "not there"
        return f"{type(exc).__name__}: {exc}"
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
def cluster_redis() -> str:
    """The Redis Cluster, once it says ``cluster_state:ok``; else the test fails."""
    state = asyncio.run(cluster_state(CLUSTER_REDIS))
    if "cluster_state:ok" not in state:
        pytest.fail(
            f"the Redis Cluster at {CLUSTER_REDIS} is not whole ({state.splitlines()[:2]}): run"
            " 'scripts/services up --cluster' (or 'scripts/test')"
        )
    return CLUSTER_REDIS


def services(*args: str, timeout: float = 300) -> str:
    """Run ``scripts/services ARGS --cluster`` (kill or bring back a node); its output."""
    done = subprocess.run(
        [str(SERVICES), *args, "--cluster"], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"services {' '.join(args)} --cluster: {done.stdout}{done.stderr}"
    return done.stdout


@pytest.fixture(scope="session", autouse=True)
def delete_cluster_test_topics() -> Iterator[None]:
    """The session's topics on the cluster go at its end, as those on the single node do."""
    yield
    delete_session_topics(CLUSTER_KAFKA)


@pytest.fixture
def whole_cluster_after() -> Iterator[None]:
    """Whatever a fault test does, the cluster is whole again after it (for the tests that follow)."""
    yield
    services("up")
