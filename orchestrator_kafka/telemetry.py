"""OpenTelemetry: spans per saga and per step, metrics, and W3C trace context in Kafka headers.

Everything here goes through ``opentelemetry-api``. Until the process installs an SDK tracer or meter
provider (:func:`configure` does, when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set; so can the user's own
set-up), :class:`Telemetry` is disabled and the hot path pays one attribute check per event.

Spans, in one trace per saga:
- ``saga.start <workflow>``: the saga is recorded. Its parent is the trace context of the start event's
  headers (or the caller of ``execute_workflow``); its context is stored with the saga so every later span
  of the saga, in any process, joins this trace.
- ``saga.dispatch <step>`` (producer): a command sent; its context travels in the command's headers.
- ``saga.handle <worker>`` (consumer, in the worker): the handler's run; its context travels in the result.
- ``saga.result <step>`` (consumer): the orchestrator taking a result.
- ``saga <workflow>``: the whole saga, from its creation to its final state, recorded when it ends.

Metrics (meter ``orchestrator_kafka``): ``saga.sagas`` (counter, by ``event``: started, completed,
compensated, failed, cancelled), ``saga.step.duration`` (histogram, seconds from dispatch to result),
``saga.retries`` (counter), ``saga.dead_letters`` (counter, by ``reason``), ``saga.in_flight`` (gauge,
sagas pending, running or compensating, refreshed from the store), ``saga.store.refused_writes``
(counter: writes the state store refused because it is full; each is retried).
"""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any

from opentelemetry import metrics, propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode

from .models import RETRY_ACTIONS
from .ports import Headers

_log = logging.getLogger(__name__)
_NAME = "orchestrator_kafka"
_FINAL_EVENTS = ("completed", "compensated", "failed", "cancelled")


def _is_real(provider: object) -> bool:
    # The API's defaults (a proxy waiting for a provider, or a no-op) mean nobody asked for telemetry.
    return type(provider).__name__ not in (
        "ProxyTracerProvider",
        "NoOpTracerProvider",
        "_ProxyMeterProvider",
        "NoOpMeterProvider",
    )


def headers_context(headers: Headers) -> Context:
    """The trace context carried by Kafka ``headers`` (W3C ``traceparent``/``tracestate``)."""
    carrier = {k: v.decode("latin-1") for k, v in headers if k in ("traceparent", "tracestate")}
    return propagate.extract(carrier)


def context_headers(context: Context | None = None) -> Headers:
    """Kafka headers carrying ``context`` (default: the current one)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return tuple((k, v.encode("latin-1")) for k, v in carrier.items())


def _traceparent_context(traceparent: str | None) -> Context | None:
    if not traceparent:
        return None
    return propagate.extract({"traceparent": traceparent})


class Telemetry:
    """The spans and metrics of one orchestrator or worker; inert unless a provider is installed.

    Build it when the component starts, after the application has set its providers up; the
    providers default to OpenTelemetry's global ones.
    """

    def __init__(
        self,
        component: str,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        tracer_provider = tracer_provider or trace.get_tracer_provider()
        meter_provider = meter_provider or metrics.get_meter_provider()
        self.tracing = _is_real(tracer_provider)
        self.metering = _is_real(meter_provider)
        self.enabled = self.tracing or self.metering
        self._component = component
        self._tracer = tracer_provider.get_tracer(_NAME)
        instruments = _instruments(meter_provider)
        self._sagas, self._duration = instruments.sagas, instruments.duration
        self._retries, self._dead = instruments.retries, instruments.dead
        self._in_flight = instruments.in_flight
        self._refused = instruments.refused

    # ---------------------------------------------------------------- orchestrator

    def saga_started(self, workflow_id: str, transaction_id: str, headers: Headers) -> str | None:
        """Record a new saga's start span, child of the trace in ``headers`` (else of the current
        span); return its ``traceparent``, to store with the saga."""
        if not self.tracing:
            return None
        parent = headers_context(headers) if headers else None
        with self._tracer.start_as_current_span(
            f"saga.start {workflow_id}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={"saga.transaction_id": transaction_id, "saga.workflow_id": workflow_id},
        ):
            return dict(context_headers()).get("traceparent", b"").decode() or None

    def dispatched(self, traceparent: str | None, payload: Mapping[str, Any], topic: str) -> Headers:
        """Record a command's dispatch span under the saga's trace; the headers that carry it."""
        body = payload["body"]
        with self._tracer.start_as_current_span(
            f"saga.dispatch {body['step']}",
            context=_traceparent_context(traceparent),
            kind=SpanKind.PRODUCER,
            attributes={
                "saga.transaction_id": payload["transaction_id"],
                "saga.workflow_id": payload["workflow_id"],
                "saga.step": body["step"],
                "saga.kind": body["kind"],
                "saga.attempt": body["attempt"],
                "messaging.destination.name": topic,
            },
        ):
            return context_headers()

    def result_taken(
        self,
        headers: Headers,
        traceparent: str | None,
        transaction_id: str,
        step: str,
        status: str,
        latency: float | None,
    ) -> None:
        """Record the orchestrator's taking of a step result: a child of the worker's span, or of the
        saga's start when the result carries no trace context (a worker without tracing)."""
        if self.tracing:
            parent = headers_context(headers)
            if not trace.get_current_span(parent).get_span_context().is_valid:
                parent = _traceparent_context(traceparent) or parent
            span = self._tracer.start_span(
                f"saga.result {step}",
                context=parent,
                kind=SpanKind.CONSUMER,
                attributes={"saga.transaction_id": transaction_id, "saga.step": step, "saga.status": status},
            )
            span.end()
        if self.metering and latency is not None:
            self._duration.record(latency, {"saga.step": step, "saga.status": status})

    def transition(
        self,
        workflow_id: str,
        transaction_id: str,
        from_state: str | None,
        to_state: str,
        actions: list[dict[str, Any]],
        traceparent: str | None,
        created_at: datetime,
        now: datetime,
        error: str | None,
    ) -> None:
        """Count what an applied transition did; at a final state, record the saga's span. A saga that
        ended and then fails (the compensation of a late success failed) is not counted or traced again:
        its audit record says so."""
        ended = to_state != from_state and to_state in _FINAL_EVENTS and from_state not in _FINAL_EVENTS
        if self.metering:
            attrs = {"saga.workflow_id": workflow_id}
            if from_state is None:
                self._sagas.add(1, {**attrs, "event": "started"})
            if ended:
                self._sagas.add(1, {**attrs, "event": to_state})
            for action in actions:
                if action["action"] in RETRY_ACTIONS:
                    self._retries.add(1, {**attrs, "saga.step": action.get("step") or ""})
        if self.tracing and ended:
            span = self._tracer.start_span(
                f"saga {workflow_id}",
                context=_traceparent_context(traceparent),
                start_time=int(created_at.timestamp() * 1e9),
                attributes={
                    "saga.transaction_id": transaction_id,
                    "saga.workflow_id": workflow_id,
                    "saga.state": to_state,
                },
            )
            if to_state != "completed":
                span.set_status(Status(StatusCode.ERROR, error or to_state))
            span.end(end_time=int(now.timestamp() * 1e9))

    def dead_letter(self, reason: str, topic: str) -> None:
        """Count a dead-lettered message."""
        if self.metering:
            self._dead.add(
                1, {"reason": reason, "messaging.source.name": topic, "component": self._component}
            )

    def refused_write(self) -> None:
        """Count a write the state store refused because it is full."""
        if self.metering:
            self._refused.add(1, {"component": self._component})

    def set_in_flight(self, counts: Mapping[str, int]) -> None:
        """The latest count of unfinished sagas in the store, by workflow, for the gauge."""
        self._in_flight.clear()
        self._in_flight.update(counts)

    # ---------------------------------------------------------------- worker

    @contextlib.contextmanager
    def handling(
        self, worker_name: str, headers: Headers, attributes: Mapping[str, Any]
    ) -> Iterator[Headers]:
        """A span around a handler's run, child of the command's dispatch; yields the headers that
        carry it into the result."""
        if not self.tracing:
            yield ()
            return
        with self._tracer.start_as_current_span(
            f"saga.handle {worker_name}",
            context=headers_context(headers),
            kind=SpanKind.CONSUMER,
            attributes=dict(attributes),
        ):
            yield context_headers()


class _Instruments:
    """A meter provider's instruments, made once: an SDK keeps the first instrument of a name and drops
    later ones, so a second :class:`Telemetry` (a component built, then started) must share them."""

    def __init__(self, meter: metrics.Meter) -> None:
        self.sagas = meter.create_counter("saga.sagas", description="Sagas started and ended, by event.")
        self.duration = meter.create_histogram(
            "saga.step.duration", unit="s", description="Time from a command's dispatch to its result."
        )
        self.retries = meter.create_counter("saga.retries", description="Retries scheduled.")
        self.dead = meter.create_counter("saga.dead_letters", description="Messages dead-lettered.")
        self.refused = meter.create_counter(
            "saga.store.refused_writes", description="Writes the state store refused because it is full."
        )
        self.in_flight: dict[str, int] = {}
        meter.create_observable_gauge(
            "saga.in_flight",
            callbacks=[self._observe],
            description="Sagas pending, running or compensating in the store, by workflow.",
        )

    def _observe(self, _options: metrics.CallbackOptions) -> list[metrics.Observation]:
        return [metrics.Observation(n, {"saga.workflow_id": w}) for w, n in self.in_flight.items()]


_BY_PROVIDER: weakref.WeakKeyDictionary[metrics.MeterProvider, _Instruments] = weakref.WeakKeyDictionary()


def _instruments(provider: metrics.MeterProvider) -> _Instruments:
    found = _BY_PROVIDER.get(provider)
    if found is None:
        found = _BY_PROVIDER[provider] = _Instruments(provider.get_meter(_NAME))
    return found


def configure(service_name: str) -> bool:
    """Install OpenTelemetry SDK providers exporting over OTLP/HTTP when ``OTEL_EXPORTER_OTLP_ENDPOINT``
    is set; return whether it did. The SDK and exporter come with the ``otel`` extra.

    Raises:
        ValidationError: the endpoint is set but the ``otel`` extra is not installed.
    """
    if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return False
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        from .errors import ValidationError

        raise ValidationError(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but the OpenTelemetry SDK is missing: "
            "pip install 'orchestrator-kafka[otel]'"
        ) from exc
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or service_name})
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(tracer_provider)
    reader = PeriodicExportingMetricReader(OTLPMetricExporter())
    metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=[reader]))
    _log.info("OpenTelemetry: exporting traces and metrics over OTLP")
    return True
