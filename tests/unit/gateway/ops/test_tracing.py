"""The gateway's tracing pieces on their own: the `tracing:` section's rules, the trace context
an attempt sends on, the sampler (the client's flag first, else the ratio), and a queued
request's spans through a real gateway app on loopback whose upstream is the client's double
(datapath/mock.py), its spans kept in the SDK's in-memory exporter."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Decision
from prometheus_client import CollectorRegistry

from gateway.app.server import create_app
from gateway.config import parse_config
from gateway.datapath.mock import MockResponse, MockUpstream
from gateway.datapath.proxy import PROXY
from gateway.datapath.trace import with_trace
from gateway.datapath.transport import UpstreamRequest
from gateway.errors import ConfigError
from gateway.ops.tracing import (
    EXPORT_BATCH,
    PROPAGATOR,
    GatewayTracer,
    HashedOnce,
    export_batch,
    open_provider,
)
from gateway.pool.live import LIVE
from replica.config import ConfigError as ReplicaConfigError
from replica.config import parse_config as parse_replica_config
from tests.support.servers import running_gateway, serve, write_config

URL = "http://127.0.0.1:9"  # nothing listens: only the mock answers
PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-{flag}"


def config(**tracing: Any) -> dict[str, Any]:
    return {"replicas": [{"url": URL}], "tracing": tracing}


def test_tracing_is_off_unless_configured_and_the_endpoint_gets_its_path() -> None:
    assert parse_config({"replicas": [{"url": URL}]}).tracing is None
    tracing = parse_config(config(otlp_endpoint="http://collector:4318")).tracing
    assert tracing is not None
    assert tracing.otlp_endpoint == "http://collector:4318/v1/traces"
    assert (tracing.sample_ratio, tracing.service_name) == (1.0, "infergate-gateway")
    kept = parse_config(config(otlp_endpoint="https://c/otlp/v1/traces")).tracing
    assert kept is not None and kept.otlp_endpoint == "https://c/otlp/v1/traces"


@pytest.mark.parametrize(
    ("tracing", "expected"),
    [
        ({"otlp_endpoint": "grpc://c:4317"}, "tracing.otlp_endpoint: expected an http://"),
        ({"otlp_endpoint": "http://c:4318?x=1"}, "tracing.otlp_endpoint: an OTLP endpoint takes"),
        ({"otlp_endpoint": "http://c", "sample_ratio": 1.5}, "tracing.sample_ratio:"),
        ({"otlp_endpoint": "http://c", "sample_ratio": -0.1}, "tracing.sample_ratio:"),
        ({"otlp_endpoint": "http://c", "service_name": ""}, "tracing.service_name:"),
        ({"sample_ratio": 0.5}, "tracing.otlp_endpoint:"),
    ],
)
def test_a_bad_tracing_section_names_its_key(tracing: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace("?", r"\?")):
        parse_config(config(**tracing))


def test_tracing_without_the_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r"tracing: .*pip install 'infergate\[otel\]'"):
        parse_config(config(otlp_endpoint="http://c:4318"))
    with pytest.raises(ReplicaConfigError, match=r"pip install 'infergate\[otel\]'"):
        parse_replica_config({"tracing": {"otlp_endpoint": "http://c:4318"}})


def test_the_replica_has_its_own_service_name() -> None:
    tracing = parse_replica_config({"tracing": {"otlp_endpoint": "http://c:4318"}}).tracing
    assert tracing is not None
    assert (tracing.service_name, tracing.otlp_endpoint) == (
        "infergate-replica",
        "http://c:4318/v1/traces",
    )


def test_an_attempt_replaces_the_clients_trace_context_and_keeps_the_rest() -> None:
    headers = [("Accept", "*/*"), ("TraceParent", "00-client-01"), ("tracestate", "a=1")]
    ours = [("traceparent", "00-attempt-01"), ("tracestate", "b=2")]
    assert with_trace(headers, ours) == [("Accept", "*/*"), *ours]


@pytest.mark.parametrize(
    ("ratio", "flag", "recorded"),
    [
        (0.0, None, False),  # no parent: the ratio decides
        (1.0, None, True),
        (0.0, "01", True),  # the client's flag decides, whatever the ratio
        (1.0, "00", False),
    ],
)
def test_the_clients_sampled_flag_decides_else_the_ratio(
    ratio: float, flag: str | None, recorded: bool
) -> None:
    provider = open_provider("http://127.0.0.1:9/v1/traces", ratio, "test")
    try:
        carrier = {} if flag is None else {"traceparent": PARENT.format(flag=flag)}
        parent = PROPAGATOR.extract(carrier)
        result = provider.sampler.should_sample(parent, 0x0AF7651916CD43DD8448EB211C80319C, "x")
        assert (result.decision == Decision.RECORD_AND_SAMPLE) is recorded
    finally:
        provider.shutdown()  # nothing was ended: nothing to send


def test_the_resource_hashed_once_is_the_resource(monkeypatch: pytest.MonkeyPatch) -> None:
    resource = Resource.create({"service.name": "s", "process.pid": 1})
    hashed = HashedOnce(resource)
    assert hashed == resource and hash(hashed) == hash(resource)  # the encoder groups by it
    assert hashed.attributes == resource.attributes and hashed.schema_url == resource.schema_url
    assert export_batch() == EXPORT_BATCH
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "512")
    assert export_batch() is None  # the SDK reads the variable


async def test_a_reload_that_changes_tracing_warns_that_it_waits_for_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "g.yaml"
    config = {
        "replicas": [{"url": URL}],
        "served_models": {"path": None},
        "reload": {"watch": False},
    }
    write_config(path, config)
    async with (
        running_gateway(path, admin_token="t") as gateway,
        aiohttp.ClientSession() as client,
    ):
        write_config(path, config | {"tracing": {"otlp_endpoint": "http://127.0.0.1:9"}})
        with caplog.at_level(logging.WARNING, logger="gateway.app.reload"):
            headers = {"Authorization": "Bearer t"}
            async with client.post(f"{gateway.url}/admin/reload", headers=headers) as response:
                assert response.status == 200, await response.text()
        assert gateway.app[PROXY].tracer is None  # still off: the provider opens at start-up
    assert "config reload (admin): 'tracing' changes take effect on restart" in caplog.text


async def test_a_queued_request_has_a_queue_span_under_its_routing_decision() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    body = b'{"usage": {"prompt_tokens": 3, "completion_tokens": 2}}'

    def handler(request: UpstreamRequest) -> MockResponse:
        headers = [("Content-Type", "application/json")]
        return MockResponse(200, headers, body, chunk_delay_s=0.2)  # holds its slot a while

    settings = parse_config(
        {
            "replicas": [{"url": URL, "models": ["m"]}],  # a model it knows goes in the span
            "served_models": {"path": None},
            "load_feedback": {"poll_interval_s": 0},
            "limits": {"max_outstanding_per_replica": 1, "max_queue": 4},
        }
    )
    app = create_app(settings, registry=CollectorRegistry(), upstream=MockUpstream(handler))
    app[PROXY].tracer = GatewayTracer(provider)
    async with serve(app) as url, aiohttp.ClientSession() as client:

        async def post() -> int:
            async with client.post(f"{url}/v1/completions", json={"model": "m"}) as answer:
                await answer.read()
                return answer.status

        assert await asyncio.gather(post(), post()) == [200, 200]
        assert [r.outstanding for r in app[LIVE].pool.all()] == [0]
    spans = exporter.get_finished_spans()
    routes = [s for s in spans if s.name == "infergate.route"]
    assert sorted(attribute(r, "infergate.route.reason") for r in routes) == ["free slot", "queued"]
    (queued,) = [r for r in routes if attribute(r, "infergate.route.reason") == "queued"]
    (queue,) = [s for s in spans if s.name == "infergate.queue"]
    assert queue.parent is not None and queued.context is not None
    assert queue.parent.span_id == queued.context.span_id
    assert 0.1 < float(attribute(queued, "infergate.queue.wait_s")) < 5
    servers = [s for s in spans if s.name == "POST /v1/completions"]
    assert len(servers) == 2
    for server in servers:
        assert attribute(server, "gen_ai.request.model") == "m"
        assert attribute(server, "gen_ai.usage.output_tokens") == 2  # read from the body


def attribute(span: ReadableSpan, name: str) -> Any:
    assert span.attributes is not None and name in span.attributes, (span.name, name)
    return span.attributes[name]
