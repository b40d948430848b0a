"""OpenTelemetry traces across client -> gateway -> replica, as a collector receives them: real
gateway and replica processes on loopback export over OTLP/HTTP to a receiver in the test
(tests/support/otlp_receiver.py), which decodes opentelemetry-proto. A first replica that
answers 503 makes the request's first attempt fail, so the trace shows the retry as a second
attempt span, and the replica's own spans hang under that one. Without `tracing:` the gateway
passes the client's trace context through untouched and loads no opentelemetry module."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from tests.support.otlp_receiver import ReceivedSpan, Receiver, otlp_receiver
from tests.support.processes import (
    REPLICA_CONFIG,
    free_port,
    replica_process,
    stop,
    wait_http_ok,
)
from tests.support.servers import (
    fake_replicas,
    gateway_config,
    get_json,
    running_gateway,
    serve,
    write_config,
)

ADMIN_TOKEN = "tracing-test-admin"
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "50"}  # ms between the exporter's batches
BODY = {"model": "tiny-gpt", "prompt": "trace me", "max_tokens": 4, "temperature": 0}
MAX_REQUESTS = 30  # until one meets the refusing replica first (each does, with odds 1/2)


def traceparent(sampled: bool = True) -> tuple[str, str, str]:
    """A client's traceparent: (header, trace id, parent span id)."""
    trace_id, span_id = f"{random.getrandbits(128):032x}", f"{random.getrandbits(64):016x}"
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}", trace_id, span_id


def refusing_app(seen: list[dict[str, str]]) -> web.Application:
    """A replica that answers every request 503 (a retriable refusal), recording its headers."""

    async def refuse(request: web.Request) -> web.Response:
        await request.read()
        seen.append(dict(request.headers))
        return web.json_response({"error": {"type": "overloaded", "message": "no"}}, status=503)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", refuse)
    return app


@asynccontextmanager
async def gateway_process(tmp_path: Path, config: dict[str, Any]) -> AsyncIterator[str]:
    """`python -m gateway` on a free port; at its end every replica's outstanding count is back
    to zero and it exits 0 (its tracer flushed)."""
    port = free_port()
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({**config, "listen": {"port": port}}))
    log = tmp_path / "gateway.log"
    env = {**os.environ, **FAST_EXPORT, "INFERGATE_ADMIN_TOKEN": ADMIN_TOKEN}
    command = [sys.executable, "-m", "gateway", "-c", str(path), "--log-level", "warning"]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_http_ok(f"{url}/readyz", proc)
        yield url
        async with aiohttp.ClientSession() as client:
            auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            state = await get_json(client, f"{url}/admin/replicas", auth)
        outstanding = {r["url"]: r["outstanding"] for r in state["replicas"]}
        assert not any(outstanding.values()), outstanding
    finally:
        code = stop(proc)
    assert code == 0, log.read_text(errors="replace")


@asynccontextmanager
async def traced_fleet(
    tmp_path: Path, workers: int = 1
) -> AsyncIterator[tuple[str, str, str, list[Any], Receiver]]:
    """A receiver, a refusing replica, a simulated replica and a gateway (`workers` processes)
    in front of both, the last two tracing: (gateway URL, refusing URL, replica URL, what the
    refuser saw, receiver)."""
    seen: list[dict[str, str]] = []
    async with otlp_receiver() as receiver, serve(refusing_app(seen)) as refusing:
        tracing = {"otlp_endpoint": receiver.url}
        replica_yaml = REPLICA_CONFIG + f"tracing: {json.dumps(tracing)}\n"
        async with replica_process(tmp_path, FAST_EXPORT, replica_yaml) as (port, _):
            replica = f"http://127.0.0.1:{port}"
            config = {
                "workers": workers,
                "routing": {"strategy": "least_outstanding_requests"},
                "replicas": [
                    {"url": refusing, "models": ["tiny-gpt"]},
                    {"url": replica, "models": ["tiny-gpt"]},
                ],
                "load_feedback": {"poll_interval_s": 0},
                "outlier_detection": None,  # the refuser stays in rotation however often it 503s
                "reload": {"watch": False},
                "tracing": tracing,
            }
            async with gateway_process(tmp_path, config) as url:
                yield url, refusing, replica, seen, receiver


async def complete(client: aiohttp.ClientSession, url: str, parent: str) -> dict[str, Any]:
    headers = {"traceparent": parent, "tracestate": "vendor=client"}
    async with client.post(f"{url}/v1/completions", json=BODY, headers=headers) as response:
        assert response.status == 200, await response.text()
        answer: dict[str, Any] = await response.json()
        return answer


def ancestors(span: ReceivedSpan, spans: list[ReceivedSpan]) -> list[str]:
    """The span ids above `span`, nearest first, as far as the received spans (and then the
    client's own parent id) go."""
    by_id = {s.span_id: s for s in spans}
    chain = []
    while span.parent_id:
        chain.append(span.parent_id)
        if span.parent_id not in by_id:
            break
        span = by_id[span.parent_id]
    return chain


def one(spans: list[ReceivedSpan], predicate: Callable[[ReceivedSpan], bool]) -> ReceivedSpan:
    found = [s for s in spans if predicate(s)]
    assert len(found) == 1, [s.name for s in found]
    return found[0]


def complete_trace(trace_id: str) -> Callable[[list[Any]], bool]:
    """The gateway's request span and the replica's decode span of this trace are in."""

    def ready(spans: list[ReceivedSpan]) -> bool:
        names = {(s.service, s.name) for s in spans if s.trace_id == trace_id}
        gateway = ("infergate-gateway", "POST /v1/completions") in names
        return gateway and ("infergate-replica", "replica.decode") in names

    return ready


async def test_one_trace_runs_from_the_client_through_a_retry_into_the_replica(
    tmp_path: Path,
) -> None:
    async with traced_fleet(tmp_path) as (url, refusing, replica, seen, receiver):
        async with aiohttp.ClientSession() as client:
            for _ in range(MAX_REQUESTS):
                parent, trace_id, client_span = traceparent()
                answer = await complete(client, url, parent)
                if any(trace_id in h.get("traceparent", "") for h in seen):
                    break  # its first attempt met the refusing replica
            else:
                raise AssertionError(f"no request went to the refusing replica first: {seen}")
            await receiver.wait_for(complete_trace(trace_id))
    spans = [s for s in receiver.spans if s.trace_id == trace_id]
    server, second = check_gateway_spans(spans, client_span, answer, refusing, replica)
    (refused,) = [h for h in seen if trace_id in h.get("traceparent", "")]
    first = one(spans, lambda s: s.kind == "client" and s.attributes["infergate.attempt"] == 1)
    assert refused["traceparent"] == f"00-{trace_id}-{first.span_id}-01"  # the client's replaced
    check_replica_spans(spans, [second.span_id, server.span_id, client_span], answer)


def check_gateway_spans(
    spans: list[ReceivedSpan], client_span: str, answer: dict[str, Any], refusing: str, replica: str
) -> tuple[ReceivedSpan, ReceivedSpan]:
    """The gateway's request span and its second attempt's, checked."""
    gateway = [s for s in spans if s.service == "infergate-gateway"]
    # The request span continues the client's trace, and knows the model and usage.
    server = one(gateway, lambda s: s.kind == "server")
    assert server.parent_id == client_span
    assert server.name == "POST /v1/completions"
    assert server.attributes["gen_ai.request.model"] == "tiny-gpt"
    assert server.attributes["gen_ai.operation.name"] == "text_completion"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["gen_ai.usage.input_tokens"] == answer["usage"]["prompt_tokens"]
    assert server.attributes["gen_ai.usage.output_tokens"] == 4

    # Two attempts under it: the refused one failed, the retry on the replica served.
    attempts = sorted(
        (s for s in gateway if s.kind == "client"), key=lambda s: s.attributes["infergate.attempt"]
    )
    assert [a.attributes["infergate.attempt"] for a in attempts] == [1, 2]
    first, second = attempts
    assert all(a.parent_id == server.span_id for a in attempts)
    assert first.attributes["infergate.replica"] == refusing
    assert first.attributes["http.response.status_code"] == 503
    assert first.status == "error" and first.attributes["error.type"] == "503"
    assert second.attributes["infergate.replica"] == replica
    assert second.attributes["http.response.status_code"] == 200
    assert second.attributes["http.request.resend_count"] == 1
    assert second.status != "error"
    assert first.end_ns <= second.start_ns

    # Each attempt's routing decision: the strategy, the replica, the candidates' costs.
    routes = sorted(
        (s for s in gateway if s.name == "infergate.route"),
        key=lambda s: s.attributes["infergate.attempt"],
    )
    assert [r.parent_id for r in routes] == [server.span_id] * 2
    assert [r.attributes["infergate.route.replica"] for r in routes] == [refusing, replica]
    for route in routes:
        assert route.attributes["infergate.route.strategy"] == "least_outstanding_requests"
        assert route.attributes["infergate.route.reason"] == "free slot"
    assert sorted(routes[0].attributes["infergate.route.candidates"]) == sorted([refusing, replica])
    assert routes[0].attributes["infergate.route.scores"] == [0.0, 0.0]
    assert routes[1].attributes["infergate.route.candidates"] == [replica]  # the untried one
    return server, second


def check_replica_spans(
    spans: list[ReceivedSpan], above: list[str], answer: dict[str, Any]
) -> None:
    """The replica's spans hang under `above` (the attempt's span id, then its ancestors')."""
    replica_spans = [s for s in spans if s.service == "infergate-replica"]
    replica_server = one(replica_spans, lambda s: s.kind == "server")
    assert replica_server.parent_id == above[0]
    assert replica_server.attributes["gen_ai.request.model"] == "tiny-gpt"
    assert replica_server.attributes["gen_ai.usage.output_tokens"] == 4
    decode = one(replica_spans, lambda s: s.name == "replica.decode")
    prefill = one(replica_spans, lambda s: s.name == "replica.prefill")
    queue = one(replica_spans, lambda s: s.name == "replica.queue")
    batch = one(replica_spans, lambda s: s.name == "replica.batch")
    assert decode.attributes["gen_ai.usage.output_tokens"] == 4
    assert prefill.attributes["gen_ai.usage.input_tokens"] == answer["usage"]["prompt_tokens"]
    assert batch.attributes["infergate.batcher"] == "continuous"
    assert batch.attributes["infergate.batch.size"] >= 1
    assert queue.end_ns <= prefill.start_ns <= prefill.end_ns <= decode.start_ns <= decode.end_ns
    assert ancestors(decode, spans) == [batch.span_id, replica_server.span_id, *above]
    assert ancestors(prefill, spans) == [batch.span_id, replica_server.span_id, *above]
    assert ancestors(queue, spans) == [replica_server.span_id, *above]


async def test_a_client_that_samples_nothing_gets_no_spans_and_a_stream_its_first_chunk(
    tmp_path: Path,
) -> None:
    # Two workers: each opens its tracer as it starts, and sends its spans as it stops.
    async with traced_fleet(tmp_path, workers=2) as (url, _, _, seen, receiver):
        async with aiohttp.ClientSession() as client:
            unsampled, dropped_id, _ = traceparent(sampled=False)
            await complete(client, url, unsampled)
            # A sampled stream after it: once its spans are in, the first's would be too.
            sampled, kept_id, _ = traceparent()
            body = BODY | {"stream": True, "stream_options": {"include_usage": True}}
            headers = {"traceparent": sampled}
            async with client.post(f"{url}/v1/completions", json=body, headers=headers) as response:
                assert response.status == 200
                assert response.content_type == "text/event-stream"
                text = await response.text()
            assert text.endswith("data: [DONE]\n\n")
            await receiver.wait_for(complete_trace(kept_id))
    assert not [s.name for s in receiver.spans if s.trace_id == dropped_id]
    # Its attempts still carried a context of their own: the same trace, not sampled.
    for headers in seen:
        if dropped_id in headers.get("traceparent", ""):
            assert headers["traceparent"].endswith("-00")

    spans = [s for s in receiver.spans if s.trace_id == kept_id]
    server = one(spans, lambda s: s.service == "infergate-gateway" and s.kind == "server")
    served = one(spans, lambda s: s.kind == "client" and s.status != "error")
    ttft = server.attributes["gen_ai.response.time_to_first_chunk"]
    assert 0 < ttft < (server.end_ns - server.start_ns) / 1e9
    assert "first_chunk" in served.events
    assert server.attributes["gen_ai.usage.output_tokens"] == 4  # from the stream's usage chunk
    decode = one(spans, lambda s: s.name == "replica.decode")
    assert decode.attributes["gen_ai.usage.output_tokens"] == 4
    assert ancestors(decode, spans)[2:4] == [served.span_id, server.span_id]


async def test_without_tracing_the_clients_context_goes_through_unchanged(
    tmp_path: Path,
) -> None:
    async with fake_replicas(1) as replicas, aiohttp.ClientSession() as client:
        write_config(tmp_path / "g.yaml", gateway_config(replicas, "round_robin"))
        async with running_gateway(tmp_path / "g.yaml") as gateway:
            parent, _, _ = traceparent()
            headers = {"traceparent": parent, "tracestate": "vendor=client"}
            async with client.post(
                f"{gateway.url}/v1/completions", json=BODY, headers=headers
            ) as response:
                assert response.status == 200
    (seen,) = replicas[0].seen
    assert seen["headers"]["traceparent"] == parent
    assert seen["headers"]["tracestate"] == "vendor=client"


LOADED = """
import asyncio, json, sys
from aiohttp import web

async def main() -> None:
    if sys.argv[1] == "gateway":
        from gateway.app.server import create_app
        from gateway.config import load_config
    else:
        from replica.server import create_app
        from replica.config import load_config
    runner = web.AppRunner(create_app(load_config(sys.argv[2])))
    await runner.setup()
    loaded = sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry")
    await runner.cleanup()
    print(json.dumps(loaded))

asyncio.run(main())
"""


@pytest.mark.parametrize("server", ["gateway", "replica"])
@pytest.mark.parametrize("traced", [False, True])
def test_opentelemetry_is_loaded_only_with_tracing(
    tmp_path: Path, server: str, traced: bool
) -> None:
    config: dict[str, Any] = (
        {"replicas": [{"url": "http://127.0.0.1:9"}], "reload": {"watch": False}}
        if server == "gateway"
        else {"engine": {"kind": "simulated"}, "models": [{"kind": "tiny-gpt"}]}
    )
    if traced:
        config["tracing"] = {"otlp_endpoint": "http://127.0.0.1:9/v1/traces"}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    run = subprocess.run(
        [sys.executable, "-c", LOADED, server, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    loaded = json.loads(run.stdout.splitlines()[-1])
    if traced:
        assert "opentelemetry.sdk.trace" in loaded
    else:
        assert loaded == []
