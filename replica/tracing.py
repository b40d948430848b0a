"""The replica's OpenTelemetry spans (`tracing:`, the `otel` extra), imported only when it is
configured: a replica without it loads no opentelemetry module and adds no middleware.

A middleware opens a server span for each inference (POST) request, its parent the caller's
`traceparent` (through a gateway: the attempt's span). Each generated sequence adds its spans
as it finishes, from the times its tracker recorded (replica/generation.py), so no token and no
batch step costs a span:

    POST /v1/completions  server: http.*, gen_ai.request.model, gen_ai.usage.*
    ├─ replica.queue      submitted until a batch took it
    └─ replica.batch      the batch it ran in until it finished: the batcher, the batch's size
       ├─ replica.prefill until its first token: prompt and cached tokens
       └─ replica.decode  first token to last: output tokens
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind, Tracer, set_span_in_context
from opentelemetry.util.types import Attributes

from gateway.ops.tracing import OPERATIONS, PROPAGATOR, close_provider, fail, open_provider
from replica.config import TracingConfig
from replica.generation import Completion, FinishHook
from replica.routes.common import TRACE, RequestTrace

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ReplicaTracer:
    """The provider (opened with the app, in this process) and the middleware that uses it."""

    def __init__(self, config: TracingConfig) -> None:
        self.config = config
        self.provider: TracerProvider | None = None
        self._tracer: Tracer | None = None

    async def lifetime(self, app: web.Application) -> AsyncIterator[None]:
        config = self.config
        self.provider = open_provider(
            config.otlp_endpoint, config.sample_ratio, config.service_name
        )
        self._tracer = self.provider.get_tracer("infergate.replica")
        try:
            yield
        finally:
            self._tracer = None
            await close_provider(self.provider)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        tracer = self._tracer
        if tracer is None or request.method != "POST":  # health, load and metrics polls
            return await handler(request)
        spans = RequestSpans(tracer, request)
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        finally:
            spans.end(status)


class RequestSpans(RequestTrace):
    def __init__(self, tracer: Tracer, request: web.Request) -> None:
        self._tracer = tracer
        path = request.path
        attributes = {"http.request.method": request.method, "url.path": path}
        operation = OPERATIONS.get(path)
        if operation is not None:
            attributes["gen_ai.operation.name"] = operation
        parent = PROPAGATOR.extract(request.headers)
        self.span = tracer.start_span(
            f"{request.method} {path}", parent, SpanKind.SERVER, attributes
        )
        self.sampled = self.span.is_recording()
        if self.sampled:
            request[TRACE] = self
        self._context = set_span_in_context(self.span)
        # Sequences finish on the forward thread too: their counts are summed under a lock.
        self._lock = threading.Lock()
        self._tokens = [0, 0]  # input, output

    def generation(self, model: str, batcher: str) -> FinishHook:
        self.span.set_attribute("gen_ai.request.model", model)
        submitted_ns = time.time_ns()
        offset_ns = submitted_ns - time.monotonic_ns()  # trackers keep time.monotonic()

        def finished(completion: Completion) -> None:
            self._sequence(completion, batcher, submitted_ns, offset_ns)

        return finished

    def _sequence(self, c: Completion, batcher: str, submitted_ns: int, offset_ns: int) -> None:
        started, first, done = (
            int(t * 1e9) + offset_ns for t in (c.started_at_s, c.first_token_at_s, c.finished_at_s)
        )
        tracer, context = self._tracer, self._context
        tracer.start_span("replica.queue", context, start_time=submitted_ns).end(started)
        batch = tracer.start_span(
            "replica.batch",
            context,
            attributes={"infergate.batcher": batcher, "infergate.batch.size": c.batch_size},
            start_time=started,
        )
        inner = set_span_in_context(batch)
        prefill: Attributes = {
            "gen_ai.usage.input_tokens": c.prompt_tokens,
            "infergate.cached_tokens": c.cached_tokens,
        }
        span = tracer.start_span("replica.prefill", inner, attributes=prefill, start_time=started)
        span.end(first)
        output = len(c.token_ids)
        decode: Attributes = {
            "gen_ai.usage.output_tokens": output,
            "gen_ai.response.finish_reasons": [c.finish_reason],
        }
        tracer.start_span("replica.decode", inner, attributes=decode, start_time=first).end(done)
        batch.end(done)
        with self._lock:
            self._tokens[0] += c.prompt_tokens
            self._tokens[1] += output

    def end(self, status: int) -> None:
        span = self.span
        if self.sampled:
            span.set_attribute("http.response.status_code", status)
            with self._lock:
                input_tokens, output_tokens = self._tokens
            if input_tokens or output_tokens:
                span.set_attribute("gen_ai.usage.input_tokens", input_tokens)
                span.set_attribute("gen_ai.usage.output_tokens", output_tokens)
            if status >= 500:
                fail(span, str(status), f"answered {status}")
        span.end()
