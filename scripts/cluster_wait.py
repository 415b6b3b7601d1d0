"""What waiting for a replica costs a batch write: RedisStateStore.apply() of batches of one partition's
sagas on a private Redis Cluster (six redis-servers on loopback, tests/redis_cluster.py), with
min_replicas 0 (the script call alone) and 1 (the script call and WAIT on one connection), rounds
interleaved. Prints wall time and client CPU per batch.

    .venv/bin/python scripts/cluster_wait.py [batch size, default 100] [rounds, default 300]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator_kafka import RedisStateStore
from orchestrator_kafka.backends.redis.partitions import partition_of
from tests.contract.test_state_store import create, step
from tests.redis_cluster import private_cluster


async def measure(url: str, size: int, rounds: int) -> None:
    stores = {n: RedisStateStore(url, key_prefix=f"wait{n}", partitions=4, min_replicas=n) for n in (0, 1)}
    txs = [tx for tx in (f"w-{i}" for i in range(size * 8)) if partition_of(tx, 4) == 0][:size]
    wall: dict[int, list[float]] = {0: [], 1: []}
    cpu: dict[int, list[float]] = {0: [], 1: []}
    try:
        for store in stores.values():
            await store.apply([create(tx) for tx in txs])
        for r in range(1, rounds + 1):
            for n, store in stores.items():
                writes = [step(tx, r, f"{tx}-{r}") for tx in txs]
                c0, w0 = time.process_time(), time.perf_counter()
                results = await store.apply(writes)
                wall[n].append(time.perf_counter() - w0)
                cpu[n].append(time.process_time() - c0)
                assert all(res.status == "applied" for res in results)
    finally:
        for store in stores.values():
            await store.close()
    for n in (0, 1):
        w = sorted(wall[n])
        print(
            f"min_replicas={n}: batch of {size}, {rounds} rounds: wall median "
            f"{statistics.median(w) * 1e3:.2f} ms, p99 {w[int(len(w) * 0.99) - 1] * 1e3:.2f} ms; "
            "client CPU median "
            f"{statistics.median(cpu[n]) * 1e3:.2f} ms per batch"
        )


def main() -> None:
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 300
    with private_cluster() as cluster:
        asyncio.run(measure(cluster.url, size, rounds))


if __name__ == "__main__":
    main()
