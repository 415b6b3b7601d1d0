"""OpenTelemetry: one trace per saga across the orchestrator and the worker, and the metrics."""

from __future__ import annotations

import asyncio
import functools
import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from orchestrator_kafka import (
    InMemoryEventBus,
    InMemoryStateStore,
    NonRetryableError,
    Orchestrator,
    StepContext,
    Worker,
    WorkflowBuilder,
    telemetry,
)
from orchestrator_kafka import orchestrator as orchestrator_module
from orchestrator_kafka import worker as worker_module
from orchestrator_kafka.codec import encode
from orchestrator_kafka.examples import orders
from orchestrator_kafka.models import StartBody, StartSaga
from orchestrator_kafka.ports import OutboxMessage

FINAL = {"completed", "compensated", "failed", "cancelled"}
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class Providers:
    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.metrics = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.metrics])

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def points(self, name: str) -> list[Any]:
        data = self.metrics.get_metrics_data()
        assert data is not None
        return [
            point
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name == name
            for point in metric.data.data_points
        ]

    def count(self, name: str, **attributes: str) -> float:
        return sum(
            p.value for p in self.points(name) if all(p.attributes.get(k) == v for k, v in attributes.items())
        )


@pytest.fixture
def providers(monkeypatch: pytest.MonkeyPatch) -> Iterator[Providers]:
    found = Providers()
    made = functools.partial(
        telemetry.Telemetry, tracer_provider=found.tracer_provider, meter_provider=found.meter_provider
    )
    monkeypatch.setattr(orchestrator_module, "Telemetry", made)
    monkeypatch.setattr(worker_module, "Telemetry", made)
    yield found
    found.tracer_provider.shutdown()
    found.meter_provider.shutdown()


async def run_orders(bus: InMemoryEventBus, store: InMemoryStateStore, starts: list[StartSaga]) -> None:
    worker = Worker(InMemoryEventBus.sharing(bus))
    for name, fn in orders.handlers.items():
        worker.register(name, fn)
    async with Orchestrator(orders.workflows, bus, store, timer_interval=0.01) as orchestrator, worker:
        await bus.publish(
            [
                OutboxMessage(
                    orchestrator.topics.start,
                    s.transaction_id,
                    encode(s),
                    (("traceparent", TRACEPARENT.encode()),),
                )
                for s in starts
            ]
        )
        for _ in range(400):
            await asyncio.sleep(0.01)
            found = await store.load_contexts([s.transaction_id for s in starts])
            states = [saga.state.value for saga in found.values()]
            if len(states) == len(starts) and all(state in FINAL for state in states):
                return
        raise AssertionError(f"sagas did not finish: {states}")


def start(tx: str, address: str) -> StartSaga:
    return StartSaga(
        event_id=f"start-{tx}",
        transaction_id=tx,
        workflow_id="order_processing",
        occurred_at=datetime.now(UTC),
        body=StartBody(context={"order_id": tx, "amount": 5, "customer_tier": "premium", "address": address}),
    )


async def test_a_saga_is_one_trace_across_orchestrator_and_worker(providers: Providers) -> None:
    bus, store = InMemoryEventBus(), InMemoryStateStore()
    await run_orders(bus, store, [start("ok-1", "Oslo")])
    spans = providers.finished()
    by_id = {s.context.span_id: s for s in spans}
    names = [s.name for s in spans]
    # Every span of the saga is in the trace of the start event's headers.
    assert {f"{s.context.trace_id:032x}" for s in spans} == {TRACEPARENT.split("-")[1]}
    assert names.count("saga.start order_processing") == 1
    assert names.count("saga order_processing") == 1
    dispatches = [s for s in spans if s.name.startswith("saga.dispatch ")]
    handles = [s for s in spans if s.name.startswith("saga.handle ")]
    results = [s for s in spans if s.name.startswith("saga.result ")]
    steps = ["check_inventory", "validate_payment", "reserve", "charge", "premium_processing", "ship"]
    assert sorted(s.name.split()[1] for s in dispatches) == sorted(steps)
    assert len(handles) == len(results) == len(steps)
    # dispatch -> handle (in the worker, through the command's headers) -> result (through the reply's).
    for handle in handles:
        assert handle.parent is not None and by_id[handle.parent.span_id].name.startswith("saga.dispatch ")
    for result in results:
        assert result.parent is not None and by_id[result.parent.span_id].name.startswith("saga.handle ")
    [root] = [s for s in spans if s.name == "saga.start order_processing"]
    for dispatch in dispatches:
        assert dispatch.parent is not None and dispatch.parent.span_id == root.context.span_id
    [saga_span] = [s for s in spans if s.name == "saga order_processing"]
    assert saga_span.attributes is not None and saga_span.attributes["saga.state"] == "completed"
    assert saga_span.status.is_ok


async def test_metrics_count_sagas_steps_retries_and_dead_letters(providers: Providers) -> None:
    bus, store = InMemoryEventBus(), InMemoryStateStore()
    await bus.start()
    await bus.publish([OutboxMessage("saga.results", "x", b"{not json")])
    await run_orders(bus, store, [start("ok-1", "Oslo"), start("bad-1", "nowhere")])
    assert providers.count("saga.sagas", event="started") == 2
    assert providers.count("saga.sagas", event="completed") == 1
    assert providers.count("saga.sagas", event="compensated") == 1
    assert providers.count("saga.sagas", event="failed") == 0
    assert providers.count("saga.dead_letters", reason="malformed_json") == 1
    assert providers.count("saga.retries") == 0
    durations = providers.points("saga.step.duration")
    assert sum(p.count for p in durations) >= 6 + 5  # every result taken, both sagas
    [failed_saga] = [
        s for s in providers.finished() if s.name == "saga order_processing" and not s.status.is_ok
    ]
    assert failed_saga.attributes is not None and failed_saga.attributes["saga.state"] == "compensated"


def test_a_saga_that_fails_after_its_end_is_not_counted_or_traced_again(providers: Providers) -> None:
    """The compensation of a late success failed for good: the saga goes from compensated to failed,
    but it ended once, as its start and end counts and its one span say."""
    t = orchestrator_module.Telemetry("orchestrator")  # the fixture's, with its providers
    now = datetime.now(UTC)
    for before, after in ((None, "running"), ("running", "compensating"), ("compensating", "compensated")):
        t.transition("wf", "tx", before, after, [], None, now, now, "step failed")
    t.transition("wf", "tx", "compensated", "failed", [], None, now, now, "late compensation failed")
    assert providers.count("saga.sagas", event="compensated") == 1
    assert providers.count("saga.sagas", event="failed") == 0
    assert [s.attributes["saga.state"] for s in providers.finished() if s.attributes] == ["compensated"]


def test_telemetry_is_off_without_an_sdk_provider() -> None:
    off = telemetry.Telemetry("orchestrator")
    assert not off.enabled and not off.tracing and not off.metering
    assert off.saga_started("wf", "tx", ()) is None


def test_configure_exports_spans_and_metrics_over_otlp_when_an_endpoint_is_set(tmp_path: Path) -> None:
    """A process that calls configure() with OTEL_EXPORTER_OTLP_ENDPOINT set sends its spans and metrics
    to that endpoint over OTLP/HTTP (here a local collector stand-in that records the paths posted)."""
    posted: list[str] = []

    class Collector(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            posted.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    script = tmp_path / "traced.py"
    script.write_text(
        "import asyncio\n"
        "from opentelemetry import metrics, trace\n"
        "from orchestrator_kafka import telemetry\n"
        "from orchestrator_kafka.demo import run_demo\n"
        "from rich.console import Console\n"
        "assert telemetry.configure('test-service')\n"
        "asyncio.run(run_demo(Console(quiet=True)))\n"
        "trace.get_tracer_provider().shutdown()\n"
        "metrics.get_meter_provider().shutdown()\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, str(script)],
            env={**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{server.server_port}"},
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        server.shutdown()
        thread.join()
        server.server_close()
    assert done.returncode == 0, done.stderr
    assert "/v1/traces" in posted and "/v1/metrics" in posted


def test_configure_does_nothing_without_an_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    assert telemetry.configure("test-service") is False


async def test_retries_timers_and_compensations_stay_in_the_saga_trace(providers: Providers) -> None:
    attempts: dict[str, int] = {}

    async def flaky(ctx: StepContext) -> dict[str, Any]:
        attempts[ctx.step] = attempts.get(ctx.step, 0) + 1
        if attempts[ctx.step] == 1:
            raise RuntimeError("first attempt fails")
        return {}

    async def refuse(ctx: StepContext) -> dict[str, Any]:
        raise NonRetryableError("no")

    workflow = (
        WorkflowBuilder("wf")
        .add_step("a", "wa", compensation="ua")
        .add_step("b", "wb")
        .with_retry_config(max_retries=2, initial_delay=0.01, max_delay=0.01)
        .build()
    )
    bus, store = InMemoryEventBus(), InMemoryStateStore()
    worker = Worker(InMemoryEventBus.sharing(bus))
    worker.register("wa", flaky)
    worker.register("wb", refuse)
    # A worker without tracing (as one in another language may be): its replies carry no trace context.
    plain = Worker(InMemoryEventBus.sharing(bus))
    plain.register("ua", lambda ctx: {})
    async with Orchestrator(workflow, bus, store, timer_interval=0.01) as orchestrator, worker, plain:
        plain._telemetry = telemetry.Telemetry("worker")  # the global providers: none, so off
        tx = await orchestrator.execute_workflow("wf", {})
        for _ in range(300):
            if (await orchestrator.get_status(tx))["state"] == "compensated":
                break
            await asyncio.sleep(0.01)
    spans = providers.finished()
    assert len({s.context.trace_id for s in spans}) == 1  # the retry and the compensation included
    names = [s.name for s in spans]
    assert names.count("saga.dispatch a") == 3  # attempt 1, its retry, and the compensation
    assert names.count("saga.result a") == 3 and "saga.handle ua" not in names
    assert providers.count("saga.retries") == 1
    assert providers.count("saga.sagas", event="compensated") == 1


async def test_in_flight_counts_the_unfinished_sagas_in_the_store(providers: Providers) -> None:
    release = asyncio.Event()

    async def wait(ctx: StepContext) -> dict[str, Any]:
        await release.wait()
        return {}

    bus, store = InMemoryEventBus(), InMemoryStateStore()
    worker = Worker(InMemoryEventBus.sharing(bus))
    worker.register("wa", wait)
    workflow = WorkflowBuilder("wf").add_step("a", "wa").build()
    # Built before it starts, as the CLI does: the gauge must still report what the started one counts.
    orchestrator = Orchestrator(workflow, bus, store, outbox_sweep_interval=0.05)

    async def gauge(expected: float) -> None:
        for _ in range(200):
            if providers.count("saga.in_flight", **{"saga.workflow_id": "wf"}) == expected:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"in flight never {expected}: {providers.points('saga.in_flight')}")

    async with orchestrator, worker:
        for _ in range(3):
            await orchestrator.execute_workflow("wf", {})
        await gauge(3)
        release.set()
        await gauge(0)
