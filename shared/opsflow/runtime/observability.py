"""What a running service tells the outside: traces, metrics, health.

- Traces: one span per processed event, named and attributed after the
  OpenTelemetry messaging conventions (``process <topic>``, kind CONSUMER).
  Its parent is the W3C trace context in the input's headers, and the outputs
  carry the span's context onward, so one trace follows a workflow instance across every
  service. Spans are recorded and exported by OTLP/HTTP when
  ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set. Without an exporter they are not
  recorded (recording spans nobody reads cost a fifth of a service's CPU in
  ``make bench``), but trace ids still exist and reach the logs and headers:
  the input's ``traceparent`` is then read and the outputs' written here
  (``unrecorded_span``, ``trace_headers``) rather than by OpenTelemetry's
  propagators, which cost about 6% of the one-hop service's CPU for the same
  two strings (py-spy during ``make bench``).
- Metrics: Prometheus, on ``OPSFLOW_METRICS_HOST:OPSFLOW_METRICS_PORT``
  (``/metrics``; loopback unless configured), next to ``/healthz`` (the loop is
  turning) and ``/readyz`` (it has joined its group).
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased
from opentelemetry.trace import (
    INVALID_SPAN_ID,
    INVALID_TRACE_ID,
    NonRecordingSpan,
    SpanContext,
    TraceFlags,
    TraceState,
)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """The service's Prometheus metrics (one registry per service process)."""

    def __init__(self, service: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["topic"]
        kw: dict[str, Any] = {"registry": self.registry, "namespace": "opsflow"}
        self.processed = Counter("events_processed", "Inputs processed", labels, **kw)
        self.failed = Counter("events_failed", "Inputs whose processing raised", labels, **kw)
        self.dead_lettered = Counter("events_dead_lettered", "Inputs sent to the DLQ", labels, **kw)
        self.retries = Counter("retries", "Transient failures retried", labels, **kw)
        self.lag = Gauge(
            "consumer_lag", "Records behind the partition's end", ["topic", "partition"], **kw
        )
        self.handler_seconds = Histogram(
            "handler_seconds",
            "Decode, handle and encode time",
            labels,
            buckets=_LATENCY_BUCKETS,
            **kw,
        )
        self.end_to_end_seconds = Histogram(
            "end_to_end_seconds",
            "Input record timestamp to output produced",
            labels,
            buckets=_LATENCY_BUCKETS,
            **kw,
        )
        self.commit_seconds = Histogram(
            "transaction_commit_seconds", "Commit duration", buckets=_LATENCY_BUCKETS, **kw
        )
        self.service = service
        self._topics: dict[str, TopicMetrics] = {}

    def topic(self, topic: str) -> TopicMetrics:
        """The per-topic series, resolved once: ``labels()`` costs more than the update."""
        found = self._topics.get(topic)
        if found is None:
            found = self._topics[topic] = TopicMetrics(
                processed=self.processed.labels(topic),
                failed=self.failed.labels(topic),
                dead_lettered=self.dead_lettered.labels(topic),
                retries=self.retries.labels(topic),
                handler_seconds=self.handler_seconds.labels(topic),
                end_to_end_seconds=self.end_to_end_seconds.labels(topic),
            )
        return found


@dataclass(frozen=True)
class TopicMetrics:
    """The series of one input topic."""

    processed: Counter
    failed: Counter
    dead_lettered: Counter
    retries: Counter
    handler_seconds: Histogram
    end_to_end_seconds: Histogram


class Health:
    """Liveness and readiness as the loop reports them."""

    def __init__(self, stale_after_s: float = 30.0) -> None:
        self.last_turn = time.monotonic()
        self.joined = False
        self.stale_after_s = stale_after_s

    def alive(self) -> bool:
        return time.monotonic() - self.last_turn < self.stale_after_s


def serve(metrics: Metrics, health: Health, *, host: str, port: int) -> ThreadingHTTPServer:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` on a daemon thread; returns the server."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._send(200, generate_latest(metrics.registry), "text/plain; version=0.0.4")
            elif self.path == "/healthz":
                ok = health.alive()
                self._send(200 if ok else 503, b"ok\n" if ok else b"loop stalled\n")
            elif self.path == "/readyz":
                ok = health.joined and health.alive()
                self._send(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
            else:
                self._send(404, b"not found\n")

        def _send(self, status: int, body: bytes, kind: str = "text/plain") -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass  # scrapes every few seconds would drown the service's own log

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True, name="metrics").start()
    return server


def exporting() -> bool:
    """Whether spans are recorded and exported (an OTLP endpoint is configured)."""
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def tracer(service: str) -> trace.Tracer:
    """A tracer for ``service``: recording and exporting by OTLP/HTTP when an endpoint is
    configured, otherwise only giving out ids."""
    provider = TracerProvider(
        resource=Resource.create({"service.name": service}),
        # Unsampled spans still get ids and carry the parent's trace id onward.
        sampler=ParentBased(ALWAYS_ON) if exporting() else ALWAYS_OFF,
    )
    if exporting():
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider.get_tracer("opsflow.runtime")


class _HeaderGetter:
    """Reads W3C trace context from Kafka headers (name, bytes) pairs."""

    def get(self, carrier: list[tuple[str, bytes]], key: str) -> list[str] | None:
        values = [v.decode("latin-1") for k, v in carrier if k == key]
        return values or None

    def keys(self, carrier: list[tuple[str, bytes]]) -> list[str]:
        return [k for k, _ in carrier]


_GETTER = _HeaderGetter()


@contextmanager
def process_span(
    tracer_: trace.Tracer,
    headers: list[tuple[str, bytes]],
    topic: str,
    attributes: dict[str, Any] | None = None,
) -> Iterator[trace.Span]:
    """A CONSUMER span for processing one record, child of the trace in its headers.

    A recorded span is made current, so instrumented calls in the handler
    join it; an unrecorded one is not (nothing could be added to it, and
    switching contexts per record is a measurable cost).
    """
    parent = propagate.extract(headers, getter=_GETTER)  # type: ignore[arg-type]
    span = tracer_.start_span(
        f"process {topic}", context=parent, kind=trace.SpanKind.CONSUMER, attributes=attributes
    )
    if not span.is_recording():
        yield span
        return
    with trace.use_span(span, end_on_exit=True):
        yield span


# W3C trace context, version 00 (what OpenTelemetry's TraceContextTextMapPropagator
# accepts): version, trace id, parent span id, flags; later versions may append fields.
_TRACEPARENT = re.compile(rb"\s*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?\s*")
# Ids as OpenTelemetry's RandomIdGenerator makes them.
_ids = random.Random()
RANDOM_TRACE_ID = TraceFlags.RANDOM_TRACE_ID


def w3c_only() -> bool:
    """Whether the configured propagators write nothing but W3C trace context on an
    output (the default ``tracecontext,baggage``: baggage is not carried onward), so
    ``unrecorded_span`` and ``trace_headers`` may do their work directly."""
    names = os.environ.get("OTEL_PROPAGATORS", "tracecontext,baggage")
    return {name.strip() for name in names.split(",")} <= {"tracecontext", "baggage"}


def _parent(headers: list[tuple[str, bytes]]) -> tuple[int, int, TraceState | None] | None:
    """The trace id, flags and trace state of the valid W3C parent in ``headers``, if any
    (as the propagator would extract it)."""
    parent = state = None
    for key, value in headers:
        if key == "traceparent" and parent is None:
            parent = value
        elif key == "tracestate" and state is None:
            state = value
    if parent is None:
        return None
    found = _TRACEPARENT.fullmatch(parent)
    if found is None:
        return None
    version, trace_id, span_id, flags, rest = found.groups()
    if version == b"ff" or (version == b"00" and rest):
        return None
    trace_number = int(trace_id, 16)
    if trace_number == INVALID_TRACE_ID or int(span_id, 16) == INVALID_SPAN_ID:
        return None
    trace_state = TraceState.from_header([state.decode("latin-1")]) if state else None
    return trace_number, int(flags, 16), trace_state


def unrecorded_span(headers: list[tuple[str, bytes]]) -> trace.Span:
    """The span of processing one record when spans are not recorded (``process_span``
    with no exporter): a new span id in the input's trace, or in a new trace, unsampled,
    the input's trace state kept; what OpenTelemetry's tracer would give, without its
    propagation machinery (only valid when ``w3c_only()``)."""
    parent = _parent(headers)
    span_id = _ids.getrandbits(64) or 1
    # Unsampled; the "random trace id" flag set on a new trace and kept from a parent.
    if parent is None:
        trace_id, trace_state, flags = _ids.getrandbits(128) or 1, None, RANDOM_TRACE_ID
    else:
        trace_id, flags, trace_state = parent
        flags &= RANDOM_TRACE_ID
    return NonRecordingSpan(
        SpanContext(
            trace_id,
            span_id,
            is_remote=False,
            trace_flags=TraceFlags(flags),
            trace_state=trace_state,
        )
    )


def trace_headers(span: trace.Span, *, direct: bool = False) -> list[tuple[str, bytes]]:
    """``span``'s context as Kafka headers (``traceparent``, ``tracestate``), for its outputs.

    ``direct``: write them here rather than by the configured propagators (only valid
    when ``w3c_only()``; see ``unrecorded_span``).
    """
    if direct:
        context = span.get_span_context()
        if not context.is_valid:
            return []
        headers = [
            (
                "traceparent",
                b"00-%032x-%016x-%02x" % (context.trace_id, context.span_id, context.trace_flags),
            )
        ]
        if context.trace_state:
            headers.append(("tracestate", context.trace_state.to_header().encode("latin-1")))
        return headers
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return [(k, v.encode("latin-1")) for k, v in carrier.items()]
