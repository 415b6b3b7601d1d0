"""The command line against real Kafka and Redis: the services as processes, the commands as a user runs
them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..conftest import require_kafka, require_redis, unique

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.kafka, pytest.mark.redis]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cli:
    env: dict[str, str]

    def __call__(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "orchestrator_kafka", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def spawn(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "orchestrator_kafka", *args],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )


def ready(port: int, path: str = "/readyz") -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def wait_ready(port: int, process: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(
                f"exited {process.returncode}: {process.stdout.read() if process.stdout else ''}"
            )
        if ready(port) == 200:
            return
        time.sleep(0.1)
    raise AssertionError("not ready in time")


def stop(process: subprocess.Popen[str], timeout: float = 30, sig: int = signal.SIGTERM) -> tuple[int, str]:
    process.send_signal(sig)
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


@pytest.fixture
def cli() -> Iterator[Cli]:
    env = dict(os.environ)
    prefix = unique("t")
    env.update(
        KAFKA_BOOTSTRAP_SERVERS=require_kafka(),
        REDIS_URL=require_redis(),
        ORCHESTRATOR_TOPIC_PREFIX=prefix,
        ORCHESTRATOR_KEY_PREFIX=prefix,
        ORCHESTRATOR_PARTITIONS="2",
    )
    yield Cli(env)
    import redis

    client = redis.Redis.from_url(env["REDIS_URL"])
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def test_run_worker_start_status_list_tail_cancel_and_graceful_stop(cli: Cli) -> None:
    created = cli("topics", "create", "--workflows", "tests.cli.app")
    assert created.returncode == 0, created.stderr
    prefix = cli.env["ORCHESTRATOR_TOPIC_PREFIX"]
    assert f"{prefix}.commands.cli_hold" in created.stdout.split()
    orchestrator_port, worker_port = free_port(), free_port()
    health = ("--health-host", "127.0.0.1", "--health-port")
    orchestrator = cli.spawn("run", "--workflows", "tests.cli.app", *health, str(orchestrator_port))
    worker = cli.spawn("worker", "--handlers", "tests.cli.app", *health, str(worker_port))
    try:
        wait_ready(orchestrator_port, orchestrator)
        wait_ready(worker_port, worker)
        assert ready(orchestrator_port, "/healthz") == 200 and ready(orchestrator_port, "/nope") == 404
        follower = cli.spawn("tail", "--follow", "--json")

        ok = cli("start", "payment", "--context", '{"amount": 5}', "--id", "pay-ok", "--wait")
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.splitlines()[0] == "pay-ok" and "completed" in ok.stdout

        context_file = ROOT / "build" / f"{prefix}.json"
        context_file.parent.mkdir(exist_ok=True)
        context_file.write_text('{"amount": 500}')
        try:
            bad = cli("start", "payment", "--context", f"@{context_file}", "--id", "pay-bad", "--wait")
        finally:
            context_file.unlink()
        assert bad.returncode == 1 and "compensated" in bad.stdout and "amount over the limit" in bad.stdout

        slow = cli("start", "payment", "--context", '{"amount": 1, "slow": true}', "--id", "pay-slow")
        assert slow.returncode == 0 and slow.stdout.strip() == "pay-slow"
        for _ in range(100):
            status = cli("status", "pay-slow", "--json")
            if status.returncode == 0 and json.loads(status.stdout)["state"] == "running":
                break
            time.sleep(0.1)
        in_flight = cli("versions", "--json")
        assert in_flight.returncode == 0, in_flight.stderr
        [row] = map(json.loads, in_flight.stdout.splitlines())
        assert (row["workflow_id"], row["in_flight"], row["parked"]) == ("payment", 1, 0)
        assert row["workflow_version"] and row["workflow_version"] in cli("versions").stdout
        cancelled = cli("cancel", "pay-slow")
        assert cancelled.returncode == 0, cancelled.stderr
        for _ in range(100):
            state = json.loads(cli("status", "pay-slow", "--json").stdout)["state"]
            if state == "cancelled":
                break
            time.sleep(0.1)
        assert state == "cancelled"

        listed = cli("list", "--json")
        assert listed.returncode == 0, listed.stderr
        states = {s["transaction_id"]: s["state"] for s in map(json.loads, listed.stdout.splitlines())}
        assert states == {"pay-ok": "completed", "pay-bad": "compensated", "pay-slow": "cancelled"}
        only = cli("list", "--state", "compensated", "--json")
        assert [json.loads(line)["transaction_id"] for line in only.stdout.splitlines()] == ["pay-bad"]
        assert cli("versions", "--json").stdout == ""  # none in flight any more
        table = cli("list")
        assert "3 sagas" in table.stdout and "pay-bad" in table.stdout
        # Pages: the next page's cursor goes to stderr, so the JSON lines stay clean.
        first = cli("list", "--json", "--limit", "2", "--since", "1h")
        assert first.returncode == 0 and len(first.stdout.splitlines()) == 2, first.stderr
        assert first.stderr.startswith("more: --cursor ")
        rest = cli("list", "--json", "--limit", "2", "--cursor", first.stderr.split()[-1])
        assert rest.returncode == 0 and rest.stderr == "", rest.stderr
        paged = [json.loads(line)["transaction_id"] for line in (first.stdout + rest.stdout).splitlines()]
        assert sorted(paged) == sorted(states)
        assert cli("list", "--json", "--since", "2099-01-01T00:00:00").stdout == ""
        bad_cursor = cli("list", "--cursor", "nope!")
        assert bad_cursor.returncode == 1 and "malformed cursor 'nope!'" in bad_cursor.stderr
        human = cli("status", "pay-bad")
        assert "compensated" in human.stdout and "amount over the limit" in human.stdout

        # The audit: every transition once, the states before and after, readable without following.
        audit = cli("tail", "--json", "--id", "pay-bad")
        records = [json.loads(line) for line in audit.stdout.splitlines()]
        versions = [r["body"]["version"] for r in records]
        assert sorted(versions) == list(range(1, len(versions) + 1))
        assert records[-1]["body"]["to_state"] == "compensated"
        assert all(r["transaction_id"] == "pay-bad" for r in records)
        pretty = cli("tail", "--id", "pay-ok")
        assert "running -> completed" in pretty.stdout
        code, followed = stop(follower, sig=signal.SIGINT)  # Ctrl-C
        assert (
            code == 130
            and "Traceback" not in followed
            and followed.count('"pay-ok"') >= 1
            and followed.count('"pay-slow"') >= 1
        )
    finally:
        orchestrator_code, orchestrator_log = stop(orchestrator)
        worker_code, worker_log = stop(worker)
    assert orchestrator_code == 0, orchestrator_log
    assert worker_code == 0, worker_log
    assert "LeaveGroup" in orchestrator_log and "Traceback" not in orchestrator_log + worker_log


def test_retry_skip_and_force_cancel(cli: Cli) -> None:
    prefix = cli.env["ORCHESTRATOR_TOPIC_PREFIX"]
    assert cli("topics", "create", "--workflows", "tests.cli.app").returncode == 0
    orchestrator_port, worker_port = free_port(), free_port()
    health = ("--health-host", "127.0.0.1", "--health-port")
    orchestrator = cli.spawn("run", "--workflows", "tests.cli.app", *health, str(orchestrator_port))
    worker = cli.spawn("worker", "--handlers", "tests.cli.app", *health, str(worker_port))
    gate = ROOT / "build" / f"{prefix}.gate"
    gate.parent.mkdir(exist_ok=True)

    def state_of(tx: str, wanted: str) -> str:
        for _ in range(200):
            state = str(json.loads(cli("status", tx, "--json").stdout)["state"])
            if state == wanted:
                break
            time.sleep(0.1)
        return state

    try:
        wait_ready(orchestrator_port, orchestrator)
        wait_ready(worker_port, worker)
        context = json.dumps({"amount": 500, "release_gate": str(gate)})
        for tx in ("pay-retry", "pay-skip"):
            failed = cli("start", "payment", "--context", context, "--id", tx, "--wait")
            assert failed.returncode == 1 and "failed" in failed.stdout, failed.stdout + failed.stderr
            error = json.loads(cli("status", tx, "--json").stdout)["error"]
            assert "the release service is down" in error

        refused = cli("cancel", "pay-retry", "--force")
        assert refused.returncode == 1 and "cannot be force-cancelled" in refused.stderr, refused.stderr
        unknown = cli("retry", "no-such-saga")
        assert unknown.returncode == 1 and "unknown transaction id" in unknown.stderr

        gate.touch()  # the release service is back
        retried = cli("retry", "pay-retry", "--reason", "the release service is back")
        assert retried.returncode == 0 and "retry requested for pay-retry" in retried.stdout, retried.stderr
        assert state_of("pay-retry", "compensated") == "compensated"

        skipped = cli("skip", "pay-skip", "hold", "--reason", "released by hand")
        assert skipped.returncode == 0, skipped.stderr
        assert state_of("pay-skip", "compensated") == "compensated"
        audit = cli("tail", "--json", "--id", "pay-skip").stdout
        assert "compensation_skipped" in audit and "released by hand" in audit

        nothing = cli("retry", "pay-retry")
        assert nothing.returncode == 1 and "no failed compensation" in nothing.stderr
        missing_reason = cli("skip", "pay-skip", "hold")
        assert missing_reason.returncode == 2 and "--reason" in missing_reason.stderr
    finally:
        gate.unlink(missing_ok=True)
        orchestrator_code, orchestrator_log = stop(orchestrator)
        worker_code, worker_log = stop(worker)
    assert orchestrator_code == 0 and worker_code == 0, orchestrator_log + worker_log


def test_errors_are_one_line_without_a_traceback(cli: Cli) -> None:
    unknown = cli("status", "no-such-saga")
    assert (
        unknown.returncode == 1 and unknown.stderr.strip() == "Error: unknown transaction id 'no-such-saga'"
    )
    no_kafka = cli("--bootstrap-servers", f"127.0.0.1:{free_port()}", "start", "payment")
    assert no_kafka.returncode == 1 and len(no_kafka.stderr.strip().splitlines()) == 1
    assert "cannot connect to Kafka" in no_kafka.stderr
    no_redis = cli("--redis-url", f"redis://127.0.0.1:{free_port()}/0", "list")
    assert no_redis.returncode == 1 and len(no_redis.stderr.strip().splitlines()) == 1
    assert "Redis" in no_redis.stderr
    bad_json = cli("start", "payment", "--context", "{nope")
    assert bad_json.returncode == 2 and "not JSON" in bad_json.stderr
    bad_module = cli("run", "--workflows", "no_such_module")
    assert bad_module.returncode == 2 and "cannot import 'no_such_module'" in bad_module.stderr
    nobody = cli("start", "no_such_workflow", "--wait")  # no orchestrator runs here
    assert nobody.returncode == 1 and "no orchestrator took" in nobody.stderr
    with socket.socket() as held:  # the health port is taken
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = str(held.getsockname()[1])
        health = ("--health-host", "127.0.0.1", "--health-port", port)
        taken = cli("run", "--workflows", "tests.cli.app", *health)
    assert taken.returncode == 1 and len(taken.stderr.strip().splitlines()) == 1, taken.stderr
    assert "address already in use" in taken.stderr
    for result in (unknown, no_kafka, no_redis, bad_json, bad_module, nobody, taken):
        assert "Traceback" not in result.stderr


def test_dlq_list_and_redrive(cli: Cli) -> None:
    """A start request for a workflow nobody runs is dead-lettered; the operator lists it, redrives it
    (dry run first), which sends it back once (refused again, it is a new letter saying where it came
    from), and a second redrive of the first letter is refused."""
    assert cli("topics", "create", "--workflows", "tests.cli.app").returncode == 0
    port = free_port()
    orchestrator = cli.spawn(
        "run", "--workflows", "tests.cli.app", "--health-host", "127.0.0.1", "--health-port", str(port)
    )
    try:
        wait_ready(port, orchestrator)
        started = cli("start", "nowhere", "--id", "lost-1")
        assert started.returncode == 0, started.stderr
        deadline = time.monotonic() + 30
        while not (listed := cli("dlq", "list", "--json").stdout.splitlines()):
            assert time.monotonic() < deadline, "the start request was never dead-lettered"
            time.sleep(0.2)
        (letter,) = map(json.loads, listed)
        assert letter["key"] == "lost-1" and letter["reason"] == "unknown_workflow"
        assert letter["redriven_by"] is None and letter["source_topic"].endswith(".start")
        table = cli("dlq", "list")
        assert "1 dead letters" in table.stdout and "unknown_workflow" in table.stdout

        dry = cli("dlq", "redrive", "--reason", "unknown_workflow", "--dry-run")
        assert dry.returncode == 0 and f"would send back {letter['position']}" in dry.stdout
        sent = cli("dlq", "redrive", "--position", letter["position"], "--request-id", "fix-1")
        assert sent.returncode == 0 and "redrive fix-1: 1 sent back, 0 refused" in sent.stdout, sent.stderr
        while len(listed := cli("dlq", "list", "--json").stdout.splitlines()) < 2:
            assert time.monotonic() < deadline, "the redriven request was not dead-lettered again"
            time.sleep(0.2)
        old, new = sorted(map(json.loads, listed), key=lambda x: x["redriven_by"] is None)
        assert old["redriven_by"] == "fix-1" and new["came_from"] == old["position"]
        pending = cli("dlq", "list", "--pending", "--json").stdout.splitlines()
        assert [json.loads(x)["position"] for x in pending] == [new["position"]]
        refused = cli("dlq", "redrive", "--position", old["position"])
        assert refused.returncode == 0 and "sent back already, by redrive fix-1" in refused.stderr
        bad = cli("dlq", "redrive")
        assert (
            bad.returncode == 1 and "choose the dead letters" in bad.stderr and "Traceback" not in bad.stderr
        )
    finally:
        code, log = stop(orchestrator)
    assert code == 0, log
