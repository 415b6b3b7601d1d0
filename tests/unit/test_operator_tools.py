"""The CLI's parts that need no services: settings, loading user modules, the Mermaid graph, probes."""

from __future__ import annotations

import asyncio
import logging

import pytest
from click.testing import CliRunner
from rich.console import Console

from orchestrator_kafka import ValidationError, WorkflowBuilder
from orchestrator_kafka.cli import cli
from orchestrator_kafka.context import LateCompensation, SagaContext, WorkflowState
from orchestrator_kafka.graph import mermaid
from orchestrator_kafka.render import status_table
from orchestrator_kafka.service import HealthServer
from orchestrator_kafka.settings import ENV_VARS, Settings


def test_settings_come_from_the_environment_and_keep_defaults_otherwise() -> None:
    assert Settings.from_env({}) == Settings()
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": "kafka:9092",
        "REDIS_URL": "redis://redis:6379/1",
        "ORCHESTRATOR_TOPIC_PREFIX": "shop",
        "ORCHESTRATOR_PARTITIONS": "12",
        "ORCHESTRATOR_HEALTH_PORT": " ",
    }
    settings = Settings.from_env(env)
    assert (settings.bootstrap_servers, settings.redis_url) == ("kafka:9092", "redis://redis:6379/1")
    assert (settings.topic_prefix, settings.partitions, settings.health_port) == ("shop", 12, None)
    with pytest.raises(ValidationError, match="ORCHESTRATOR_PARTITIONS must be a whole number"):
        Settings.from_env({"ORCHESTRATOR_PARTITIONS": "many"})
    assert set(ENV_VARS) == set(Settings.__dataclass_fields__)


def test_replication_factor_setting_flag_and_errors() -> None:
    assert Settings().replication_factor is None and Settings().event_bus().replication_factor is None
    settings = Settings.from_env({"ORCHESTRATOR_REPLICATION_FACTOR": "2"})
    assert settings.replication_factor == 2 and settings.event_bus().replication_factor == 2
    for bad in ("0", "-1"):
        with pytest.raises(ValidationError, match="ORCHESTRATOR_REPLICATION_FACTOR must be at least 1"):
            Settings.from_env({"ORCHESTRATOR_REPLICATION_FACTOR": bad})
    with pytest.raises(ValidationError, match="ORCHESTRATOR_REPLICATION_FACTOR must be a whole number"):
        Settings.from_env({"ORCHESTRATOR_REPLICATION_FACTOR": "three"})
    ctx = cli.make_context("orchestrator-kafka", ["--replication-factor", "3", "list"])
    with ctx:
        ctx.invoke(cli.callback, **ctx.params)  # type: ignore[arg-type]
        assert ctx.obj.replication_factor == 3
    result = CliRunner().invoke(cli, ["--replication-factor", "0", "list"])
    assert result.exit_code == 2 and "--replication-factor" in result.output


def test_retention_settings_flags_and_their_errors() -> None:
    defaults = Settings()
    assert (defaults.retention, defaults.failed_retention) == (7 * 24 * 3600, 30 * 24 * 3600)
    settings = Settings.from_env({"ORCHESTRATOR_RETENTION": "60", "ORCHESTRATOR_FAILED_RETENTION": "None"})
    assert (settings.retention, settings.failed_retention) == (60, None)
    store = settings.state_store()  # connects on first use only
    assert (store.retention, store.failed_retention) == (60, None)
    for bad in ("0", "-1", "7d", "1.5"):
        with pytest.raises(ValidationError, match=f"ORCHESTRATOR_RETENTION must be .* not '{bad}'"):
            Settings.from_env({"ORCHESTRATOR_RETENTION": bad})
    result = CliRunner().invoke(cli, ["--failed-retention", "soon", "list"])
    assert result.exit_code == 1 and "--failed-retention must be" in result.output


def test_min_replicas_setting_flag_and_their_errors() -> None:
    assert Settings().min_replicas is None  # auto: decided by the store on first use
    assert Settings.from_env({"ORCHESTRATOR_MIN_REPLICAS": "auto"}).min_replicas is None
    settings = Settings.from_env({"ORCHESTRATOR_MIN_REPLICAS": "2"})
    assert settings.min_replicas == 2 and settings.state_store().min_replicas == 2
    assert Settings.from_env({"ORCHESTRATOR_MIN_REPLICAS": "0"}).state_store().min_replicas == 0
    for bad in ("-1", "one", "1.5"):
        with pytest.raises(ValidationError, match=f"ORCHESTRATOR_MIN_REPLICAS must be .* not '{bad}'"):
            Settings.from_env({"ORCHESTRATOR_MIN_REPLICAS": bad})
    result = CliRunner().invoke(cli, ["--min-replicas", "many", "list"])
    assert result.exit_code == 1 and "--min-replicas must be" in result.output


def graph_of(*args: str) -> str:
    result = CliRunner().invoke(cli, ["graph", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_graph_draws_parallel_groups_conditions_and_compensations() -> None:
    text = graph_of("--workflows", "orchestrator_kafka.examples.orders")
    lines = text.splitlines()
    assert lines[0] == "flowchart TD"
    assert '  subgraph parallel_0["parallel"]' in lines
    # The parallel branches join before the next stage.
    assert "  s0 --> s2" in lines and "  s1 --> s2" in lines
    # The conditional step may be skipped: both ways lead on to ship.
    assert "  if_s4 -- yes --> s4" in lines
    assert "  if_s4 -- no --> s5" in lines
    assert "  s3 -.-> undo_s3" in lines and "  undo_s3[/compensate: refund_payment/]" in lines
    assert "  s5 --> done" in lines
    assert "timeout 5s" in text


def test_graph_names_a_named_condition_and_keeps_similar_names_apart() -> None:
    def is_vip(ctx: object) -> bool:
        return True

    definition = (
        WorkflowBuilder("w")
        .add_step("a.b", "wa")
        .add_step("a-b", "wb")
        .add_conditional_step("a_b", "wc", condition=is_vip)
        .build()
    )
    text = mermaid(definition)
    assert '  if_s2{"is_vip?"}' in text
    assert '  s0["a.b<br/>' in text and '  s1["a-b<br/>' in text and '  s2["a_b<br/>' in text
    assert "  s0 --> s1" in text and "  s1 --> if_s2" in text


def test_graph_and_loading_errors_are_clear() -> None:
    runner = CliRunner()
    missing = runner.invoke(cli, ["graph", "nope", "--workflows", "orchestrator_kafka.examples.orders"])
    assert missing.exit_code == 1 and "no workflow 'nope'" in missing.output
    no_module = runner.invoke(cli, ["graph", "--workflows", "no_such_module_here"])
    assert no_module.exit_code == 2 and "cannot import 'no_such_module_here'" in no_module.output
    no_attr = runner.invoke(cli, ["graph", "--workflows", "orchestrator_kafka.examples.orders:nothing"])
    assert no_attr.exit_code == 2 and "has no attribute 'nothing'" in no_attr.output
    not_workflows = runner.invoke(
        cli, ["graph", "--workflows", "orchestrator_kafka.examples.orders:handlers"]
    )
    assert not_workflows.exit_code == 2 and "is not a workflow definition" in not_workflows.output


async def test_health_server_answers_liveness_and_readiness() -> None:
    ready = False
    server = HealthServer("127.0.0.1", 0, lambda: ready)
    await server.start()

    async def get(path: str) -> str:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        answer = await reader.read()
        writer.close()
        return answer.decode().splitlines()[0]

    try:
        assert await get("/healthz") == "HTTP/1.1 200 OK"
        assert await get("/readyz") == "HTTP/1.1 503 Service Unavailable"
        ready = True
        assert await get("/readyz") == "HTTP/1.1 200 OK"
        assert await get("/other") == "HTTP/1.1 404 Not Found"
    finally:
        await server.stop()


async def test_readiness_is_503_with_the_reason_while_the_service_reports_a_problem() -> None:
    problem: str | None = "the state store has refused writes for 3s: OOM"
    server = HealthServer("127.0.0.1", 0, lambda: True, lambda: problem)
    await server.start()

    async def get(path: str) -> list[str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        answer = await reader.read()
        writer.close()
        return answer.decode().splitlines()

    try:
        answer = await get("/readyz")
        assert answer[0] == "HTTP/1.1 503 Service Unavailable"
        assert answer[-1] == "not ready: the state store has refused writes for 3s: OOM"
        assert (await get("/healthz"))[0] == "HTTP/1.1 200 OK"  # alive: a restart would not help
        problem = None
        assert (await get("/readyz"))[0] == "HTTP/1.1 200 OK"
    finally:
        await server.stop()


def test_repeated_log_lines_are_held_back_and_counted() -> None:
    from orchestrator_kafka.service import RepeatFilter

    repeat = RepeatFilter(interval=10)

    def record(msg: str, at: float, name: str = "aiokafka") -> logging.LogRecord:
        made = logging.LogRecord(name, logging.ERROR, __file__, 1, msg, ("h", 1), None)
        made.created = at
        return made

    assert repeat.filter(record("Unable connect to %s:%s", 100.0))
    assert not any(repeat.filter(record("Unable connect to %s:%s", 100.0 + i / 10)) for i in range(1, 50))
    assert repeat.filter(record("another line", 101.0))  # other templates pass
    assert repeat.filter(record("Unable connect to %s:%s", 101.0, name="redis.asyncio"))  # other loggers
    # The project's own lines are never held back: each dead letter is a line.
    assert all(
        repeat.filter(record("dead letter from %s", 100.0 + i, name="orchestrator_kafka.x")) for i in range(5)
    )
    later = record("Unable connect to %s:%s", 111.0)
    assert repeat.filter(later) and "and 49 more like it in the last 10s" in later.getMessage()


def test_status_table_shows_the_compensations_of_late_successes() -> None:
    saga = SagaContext("tx-1", "orders", WorkflowState.FAILED, error="late compensation failed")
    saga.late_runs["tx-1:charge:compensate:late-1"] = LateCompensation("charge", 3, failed=True, error="Boom")
    ship = "tx-1:ship:compensate:late-2"
    saga.late_runs[ship] = LateCompensation("ship", 1, f"{ship}.1")
    console = Console(record=True, width=120)
    console.print(status_table(saga.to_status()))
    text = console.export_text()
    assert "charge (late)  failed, attempt 3  Boom" in text
    assert "ship (late)    pending, attempt 1" in text
