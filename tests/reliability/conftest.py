"""Fixtures of the reliability tests: a :class:`World` of processes on the shared Kafka and Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ..conftest import require_kafka, require_redis
from .harness import World


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    redis_url = require_redis()
    made = World(require_kafka(), redis_url, redis_url, tmp_path)
    try:
        yield made
    finally:
        await made.close()
