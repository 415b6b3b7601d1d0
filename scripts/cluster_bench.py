"""The cluster benchmark: sagas on the three-broker Kafka and the Redis Cluster of
``scripts/services up --cluster``, run by one orchestrator process and then by two sharing the work.

usage: scripts/bench --cluster [--sagas N] [--inflight 500,1000] [--partitions 8]

This machine has two cores, so two orchestrators cannot run faster than one here: every process of the
run (broker JVMs, Redis nodes, the worker, the driver) shares them. What scales on more machines is
shown instead: the work splits evenly between the orchestrators (each one's share of their CPU), and
their CPU per saga step does not grow at the same load per orchestrator. Each level L runs three rows:
one orchestrator with L sagas in flight; two sharing the same L (each sees half the load, so its
batches are half as big and the fixed cost of a batch, a Redis call and a Kafka request, weighs more:
the price of splitting a load that one process could carry); and two with 2L in flight, the same load
per process, as N machines carrying N times the load would be. Topics get replication factor 3, as the
orchestrator gives them on three brokers, so every figure includes replication.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

os.environ["BENCH_CLUSTER"] = "1"
os.environ.setdefault("BENCH_REPLICATION", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import BOOTSTRAP, REDIS_URL, STEPS, USED_PREFIXES, Result, drop, run_echo, run_sagas


def row(r: Result, orchestrators: int) -> str:
    mine = {k: v for k, v in r.cpu.items() if k.startswith("orchestrator")}
    total = sum(mine.values())
    per_step = total / r.units * 1e3
    shares = " / ".join(f"{v / total:.0%}" for v in mine.values()) if total else "-"
    others = ", ".join(f"{k} {v / r.units * 1e3:.3f}" for k, v in r.cpu.items() if k not in mine)
    return (
        f"{orchestrators:>13} {r.inflight:>9} {r.rate:>8.0f} {r.p50_ms:>7.1f} {r.p99_ms:>7.1f} "
        f"{per_step:>12.3f} {shares:>11}  {others}"
    )


async def main(args: argparse.Namespace) -> None:
    levels = [int(x) for x in args.inflight.split(",")]
    where = f"Kafka {BOOTSTRAP}, Redis Cluster {REDIS_URL}"
    print(f"# orchestrator-kafka cluster bench: {where}, {os.cpu_count()} cores")
    print(
        f"# {args.sagas} sagas of {STEPS} steps per row, {args.partitions} partitions, replication factor "
        f"{os.environ['BENCH_REPLICATION']}; cpu in ms per saga step"
    )
    print(
        f"{'orchestrators':>13} {'in flight':>9} {'steps/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'orch cpu/step':>12} {'split':>11}  other cpu per step"
    )
    await run_echo(2000, 200, args.partitions)  # warm-up, not reported
    for level in levels:
        # One orchestrator; two sharing the same load; two with twice the load, the same per process.
        for orchestrators, inflight in ((1, level), (2, level), (2, 2 * level)):
            result = await run_sagas(
                args.sagas * inflight // level, inflight, args.partitions, orchestrators=orchestrators
            )
            print(row(result, orchestrators), flush=True)
    for prefix in USED_PREFIXES:
        await drop(prefix)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cluster", action="store_true", help="(what scripts/bench passes to get here)")
    parser.add_argument("--sagas", type=int, default=3000)
    parser.add_argument("--inflight", default="500,1000", help="comma-separated concurrency levels")
    parser.add_argument("--partitions", type=int, default=8)
    asyncio.run(main(parser.parse_args()))
