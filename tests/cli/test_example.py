"""The documented multi-process example runs from its one command and ends every order as it says."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from ..conftest import require_kafka, require_redis, unique

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.kafka
@pytest.mark.redis
@pytest.mark.timeout(300)
def test_scripts_example_runs_the_orders_across_processes() -> None:
    require_kafka(), require_redis()
    prefix = unique("t")
    done = subprocess.run(
        ["scripts/example", "6"],
        cwd=ROOT,
        env={**os.environ, "EXAMPLE_PREFIX": prefix},
        capture_output=True,
        text=True,
        timeout=280,
    )
    try:
        assert done.returncode == 0, done.stdout + done.stderr
        out = done.stdout
        assert "6 sagas ended" in out
        assert len(re.findall(r"order service: placed order-\d", out)) == 6
        # Orders 3 and 6 ship to nowhere and compensate; the rest complete.
        assert len(re.findall(r"-> completed", out)) == 4
        assert len(re.findall(r"-> compensated", out)) == 2
        status = out.split("== orchestrator-kafka status order-3")[1]
        assert "compensated" in status and "NonRetryableError: the carrier" in status
    finally:
        import redis

        client = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
