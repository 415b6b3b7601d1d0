"""Runs ``orchestrator-kafka`` (the CLI, unchanged) with test-only fault hooks installed first.

    python tests/reliability/launch.py run --workflows tests.reliability.app ...

Environment:

* ``REL_CRASH=<point>:<n>``: ``os._exit(9)`` (a crash: nothing is flushed, no finally runs) at the
  n-th time the orchestrator reaches ``point``:

  - ``before_write``: a batch of transitions is about to be written to Redis (nothing written yet)
  - ``after_write``: the batch was written, its outboxes are not published yet
  - ``after_publish``: a publish was acknowledged by Kafka; the consumed offsets are not committed yet
  - ``compensating``: a batch that moves some saga while it compensates was written, not published

* ``REL_SESSION_MS`` / ``REL_MAX_POLL_MS``: the Kafka consumers' session timeout and max poll interval,
  so a stalled (SIGSTOP) instance is evicted from the group within a test's time.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from orchestrator_kafka.backends.kafka import KafkaEventBus
from orchestrator_kafka.backends.redis import RedisStateStore
from orchestrator_kafka.cli import main


def _crash(point: str) -> None:
    sys.stderr.write(f"REL_CRASH: exiting at {point}\n")
    sys.stderr.flush()
    os._exit(9)


def _install_crash(spec: str) -> None:
    point, _, nth = spec.partition(":")
    target = int(nth or "1")
    count = 0

    def hit() -> bool:
        nonlocal count
        count += 1
        return count >= target

    if point in ("before_write", "after_write", "compensating"):
        original_apply = RedisStateStore.apply

        async def apply(self: RedisStateStore, writes: Any) -> Any:
            real = [w for w in writes if w.saga is not None]
            if point == "before_write" and real and hit():
                _crash(point)
            results = await original_apply(self, writes)
            if point == "after_write" and real and hit():
                _crash(point)
            if point == "compensating" and any(w.saga.state.value == "compensating" for w in real) and hit():
                _crash(point)
            return results

        RedisStateStore.apply = apply  # type: ignore[method-assign]
    elif point == "after_publish":
        original_publish = KafkaEventBus.publish

        async def publish(self: KafkaEventBus, messages: Any) -> None:
            await original_publish(self, messages)
            if messages and hit():
                _crash(point)

        KafkaEventBus.publish = publish  # type: ignore[method-assign]
    else:
        raise SystemExit(f"unknown REL_CRASH point {point!r}")


def _install_timeouts() -> None:
    session, max_poll = os.environ.get("REL_SESSION_MS"), os.environ.get("REL_MAX_POLL_MS")
    if not session and not max_poll:
        return
    original_init = KafkaEventBus.__init__

    def init(self: KafkaEventBus, *args: Any, **kwargs: Any) -> None:
        if session:
            kwargs["session_timeout_ms"] = int(session)
        if max_poll:
            kwargs["max_poll_interval_ms"] = int(max_poll)
        original_init(self, *args, **kwargs)

    KafkaEventBus.__init__ = init  # type: ignore[method-assign]


if __name__ == "__main__":
    if os.environ.get("REL_CRASH"):
        _install_crash(os.environ["REL_CRASH"])
    _install_timeouts()
    sys.argv[0] = "orchestrator-kafka"
    main()
