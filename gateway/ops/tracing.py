"""OpenTelemetry traces (`tracing:`, the `otel` extra): the tracer the proxy tells of each request
(gateway/datapath/trace.py), and the provider, which the replica opens too (replica/tracing.py).
Imported only when `tracing:` is configured, so a gateway without it loads no opentelemetry
module; each process (each of `workers: N`) opens a provider of its own as its app starts.

The spans of one proxied request, in the client's trace when it sent a `traceparent` (its
sampled flag decides; else `sample_ratio` of the traces are kept):

    {METHOD} {path}       server: http.*, gen_ai.request.model, gen_ai.usage.*, and
    │                     gen_ai.response.time_to_first_chunk for a stream
    ├─ infergate.route    per attempt, admission until the grant: strategy, reason, replica,
    │  │                  the candidates and their costs (lower wins)
    │  └─ infergate.queue while it waited for a slot in the gateway queue
    └─ {METHOD}           client, per attempt: infergate.attempt, the replica, its status,
                          ERROR when it failed; the replica's spans are its children

Spans go in batches of EXPORT_BATCH over OTLP/HTTP (protobuf) from the SDK's thread; the provider
is shut down, and what it holds sent, as the app stops.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping, Sequence

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from yarl import URL

from gateway.datapath.downstream import Downstream
from gateway.flow.service import Usage
from gateway.routing.request import Decision

PROPAGATOR = TraceContextTextMapPropagator()  # W3C traceparent and tracestate
OPERATIONS = {"/v1/chat/completions": "chat", "/v1/completions": "text_completion"}
TTFT = "gen_ai.response.time_to_first_chunk"
# The export thread encodes a batch holding the GIL, so the event loop waits for it: 64 spans
# take ~3 ms, within one switch interval (the SDK's 512: ~25 ms, a gateway P99 of 40 ms at 300
# req/s against 11 ms with 64; loadtests/tracing_bench.py).
EXPORT_BATCH = 64


def open_provider(endpoint: str, sample_ratio: float, service_name: str) -> TracerProvider:
    """A provider exporting to `endpoint` in batches; parent-based sampling, else the ratio."""
    resource = Resource.create({"service.name": service_name, "process.pid": os.getpid()})
    provider = TracerProvider(
        sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
        # The pid tells the processes of one service apart (`workers: N`, several replicas).
        resource=HashedOnce(resource),
        shutdown_on_exit=False,  # the app's lifetime shuts it down (close_provider)
    )
    exporter = OTLPSpanExporter(endpoint=endpoint)
    provider.add_span_processor(BatchSpanProcessor(exporter, max_export_batch_size=export_batch()))
    return provider


def export_batch() -> int | None:
    """Spans a batch: EXPORT_BATCH unless OTEL_BSP_MAX_EXPORT_BATCH_SIZE says (None: the SDK
    reads it)."""
    return None if os.environ.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE") else EXPORT_BATCH


class HashedOnce(Resource):
    """The resource, its hash computed once: the exporter hashes a span's resource for every
    span it encodes, and Resource.__hash__ writes the attributes out as JSON each time (a fifth
    of encoding a span)."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource.attributes, resource.schema_url)
        self._hash = super().__hash__()

    def __hash__(self) -> int:
        return self._hash


async def close_provider(provider: TracerProvider) -> None:
    """Send what is still held and stop the export thread (off the event loop: it blocks)."""
    await asyncio.to_thread(provider.shutdown)


def context_headers(span: Span) -> list[tuple[str, str]]:
    """`traceparent` (and `tracestate`) naming `span` as the parent."""
    carrier: dict[str, str] = {}
    PROPAGATOR.inject(carrier, context=set_span_in_context(span))
    return list(carrier.items())


def fail(span: Span, reason: str, message: str) -> None:
    span.set_attribute("error.type", reason)
    span.set_status(Status(StatusCode.ERROR, message))


class GatewayTracer:
    """The datapath's Tracer: a server span for each proxied request."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer("infergate.gateway")

    def request(self, request: Downstream) -> RequestSpans:
        parent = PROPAGATOR.extract(request.headers)
        path = request.path
        attributes = {
            "http.request.method": request.method,
            "url.path": path,
            "url.scheme": request.scheme,
            "client.address": request.remote or "",
        }
        operation = OPERATIONS.get(path)
        if operation is not None:
            attributes["gen_ai.operation.name"] = operation
        span = self._tracer.start_span(
            f"{request.method} {path}", parent, SpanKind.SERVER, attributes
        )
        return RequestSpans(self._tracer, span, request.method, path)

    async def close(self) -> None:
        await close_provider(self.provider)


class RequestSpans:
    """One request's spans (datapath/trace.RequestTrace)."""

    def __init__(self, tracer: Tracer, span: Span, method: str, path: str) -> None:
        self._tracer = tracer
        self.span = span
        self.sampled = span.is_recording()
        self._context = set_span_in_context(span)
        self._method, self._path = method, path
        self._started_ns = time.time_ns()
        self._first_chunk = False

    def classified(self, model: str | None, request_id: str) -> None:
        if self.sampled:
            if model:
                self.span.set_attribute("gen_ai.request.model", model)
            self.span.set_attribute("infergate.request_id", request_id)

    def attempt(self, number: int, decision: Decision, since_ns: int) -> AttemptSpan:
        now = time.time_ns()
        attributes = None  # unsampled: the span records nothing, its context is all it gives
        if self.sampled:
            self._route(number, decision, since_ns, now)
            attributes = self._attempt_attributes(number, decision.replica.url)
        span = self._tracer.start_span(
            self._method, self._context, SpanKind.CLIENT, attributes, start_time=now
        )
        return AttemptSpan(self, span)

    def _attempt_attributes(self, number: int, url: str) -> dict[str, str | int]:
        parsed = URL(url)
        attributes: dict[str, str | int] = {
            "http.request.method": self._method,
            "url.full": url + self._path,
            "server.address": parsed.host or "",
            "server.port": parsed.port or 0,
            "infergate.attempt": number,
            "infergate.replica": url,
        }
        if number > 1:
            attributes["http.request.resend_count"] = number - 1
        return attributes

    def _route(self, number: int, decision: Decision, since_ns: int, now_ns: int) -> None:
        attributes = route_attributes(decision)
        attributes["infergate.attempt"] = number
        queued = decision.reason == "queued"
        if queued:
            attributes["infergate.queue.wait_s"] = (now_ns - since_ns) / 1e9
        span = self._tracer.start_span(
            "infergate.route", self._context, attributes=attributes, start_time=since_ns
        )
        if queued:
            queue = self._tracer.start_span(
                "infergate.queue", set_span_in_context(span), start_time=since_ns
            )
            queue.end(now_ns)
        span.end(now_ns)

    def first_chunk(self) -> None:
        if self.sampled and not self._first_chunk:
            self._first_chunk = True
            self.span.set_attribute(TTFT, (time.time_ns() - self._started_ns) / 1e9)

    def end(self, status: int, usage: Usage | None) -> None:
        span = self.span
        if self.sampled:
            span.set_attribute("http.response.status_code", status)
            if usage is not None:
                span.set_attribute("gen_ai.usage.input_tokens", usage.prompt)
                span.set_attribute("gen_ai.usage.output_tokens", usage.completion)
            if status >= 500:  # a server span's error is the server's (semantic conventions)
                fail(span, str(status), f"answered {status}")
        span.end()


def route_attributes(decision: Decision) -> dict[str, str | int | float | Sequence[str | float]]:
    """The decision as span attributes: the candidates and their costs as two lists in the
    same order, cheapest first."""
    attributes: dict[str, str | int | float | Sequence[str | float]] = {
        "infergate.route.strategy": decision.strategy or "none",
        "infergate.route.reason": decision.reason,
        "infergate.route.replica": decision.replica.url,
    }
    scores: Mapping[str, float] | None = decision.scores
    if scores:
        ranked = sorted(scores.items(), key=lambda item: item[1])
        attributes["infergate.route.candidates"] = [url for url, _ in ranked]
        attributes["infergate.route.scores"] = [float(cost) for _, cost in ranked]
    return attributes


class AttemptSpan:
    """One attempt's client span (datapath/trace.AttemptTrace)."""

    def __init__(self, request: RequestSpans, span: Span) -> None:
        self._request = request
        self.span = span
        self._failed = False

    def headers(self) -> list[tuple[str, str]]:
        return context_headers(self.span)

    def first_chunk(self) -> None:
        if self._request.sampled:
            self.span.add_event("first_chunk")
            self._request.first_chunk()

    def failed(self, reason: str, message: str) -> None:
        self._failed = True
        if self._request.sampled:
            fail(self.span, reason, message)

    def end(self, status: int) -> None:
        span = self.span
        if self._request.sampled:
            span.set_attribute("http.response.status_code", status)
            if status >= 400 and not self._failed:  # a client span's 4xx is an error too
                fail(span, str(status), f"answered {status}")
        span.end()
