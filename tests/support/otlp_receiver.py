"""A small OTLP/HTTP traces receiver on loopback: POST /v1/traces with an
`ExportTraceServiceRequest` in protobuf (what the SDK's exporter sends), decoded with
opentelemetry-proto into plain `ReceivedSpan`s a test can search."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from tests.support.servers import serve

KINDS = {0: "unspecified", 1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}
STATUS = {0: "unset", 1: "ok", 2: "error"}


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    kind: str
    trace_id: str  # hex, as in a traceparent
    span_id: str
    parent_id: str  # "" for a root
    start_ns: int
    end_ns: int
    status: str
    attributes: dict[str, Any]
    events: tuple[str, ...] = ()


def _value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, which) if which is not None else None


def decode(body: bytes) -> list[ReceivedSpan]:
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans = []
    for resource in request.resource_spans:
        resource_attributes = {a.key: _value(a.value) for a in resource.resource.attributes}
        service = str(resource_attributes.get("service.name", ""))
        for scope in resource.scope_spans:
            for span in scope.spans:
                spans.append(
                    ReceivedSpan(
                        service=service,
                        name=span.name,
                        kind=KINDS[span.kind],
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_id=span.parent_span_id.hex(),
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        status=STATUS[span.status.code],
                        attributes={a.key: _value(a.value) for a in span.attributes},
                        events=tuple(e.name for e in span.events),
                    )
                )
    return spans


@dataclass
class Receiver:
    url: str = ""  # .../v1/traces
    spans: list[ReceivedSpan] = field(default_factory=list)
    exports: int = 0  # requests received
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def find(self, predicate: Callable[[ReceivedSpan], bool]) -> list[ReceivedSpan]:
        return [s for s in self.spans if predicate(s)]

    async def wait_for(
        self, predicate: Callable[[list[ReceivedSpan]], bool], timeout_s: float = 10.0
    ) -> None:
        """Until `predicate` holds of the spans received (bounded), woken by each export."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not predicate(self.spans):
            self.arrived.clear()
            remaining = deadline - loop.time()
            assert remaining > 0, f"spans not received in time; have {self.names()}"
            try:
                async with asyncio.timeout(remaining):
                    await self.arrived.wait()
            except TimeoutError:
                pass

    def names(self) -> list[str]:
        return sorted(f"{s.service}:{s.name}" for s in self.spans)


def receiver_app(receiver: Receiver) -> web.Application:
    async def traces(request: web.Request) -> web.Response:
        if request.content_type != "application/x-protobuf":
            return web.Response(status=415, text="expected application/x-protobuf")
        receiver.spans.extend(decode(await request.read()))
        receiver.exports += 1
        receiver.arrived.set()
        body = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=body, content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    return app


@asynccontextmanager
async def otlp_receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    async with serve(receiver_app(receiver)) as url:
        receiver.url = f"{url}/v1/traces"
        yield receiver
