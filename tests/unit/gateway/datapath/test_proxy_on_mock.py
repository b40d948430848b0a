"""The proxy's retry, relay and cut logic with the upstream client replaced by its double
(datapath/mock.py): a real gateway app on loopback, a real client, no replica process. What
the client sees, what the replicas were sent, and the counts back at zero."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from gateway.app.server import create_app
from gateway.config import parse_config
from gateway.datapath.mock import MockResponse, MockUpstream
from gateway.datapath.transport import UpstreamFailure, UpstreamRequest
from gateway.pool.live import LIVE, Live
from tests.support.servers import serve

# Nothing listens on these: only the mock answers (the pollers' own requests are refused).
URLS = ["http://127.0.0.1:9", "http://127.0.0.1:19"]
Handler = Callable[[UpstreamRequest], MockResponse]


@asynccontextmanager
async def gateway(handler: Handler, **extra: Any) -> AsyncIterator[tuple[str, Live, MockUpstream]]:
    config = parse_config(
        {
            "routing": {"strategy": "round_robin", "seed": 1},
            "replicas": [{"url": u} for u in URLS],
            "served_models": {"path": None},
            "load_feedback": {"poll_interval_s": 0},
            **extra,
        }
    )
    upstream = MockUpstream(handler)
    app = create_app(config, registry=CollectorRegistry(), upstream=upstream)
    async with serve(app) as url:
        yield url, app[LIVE], upstream
        assert [(r.url, r.outstanding) for r in app[LIVE].pool.all() if r.outstanding] == []


async def test_a_503_is_retried_on_another_replica_and_the_client_gets_the_second_answer() -> None:
    first: list[str] = []  # the replica asked first answers 503

    def handler(request: UpstreamRequest) -> MockResponse:
        first[:] = first or [request.replica_url]
        if request.replica_url == first[0]:
            return MockResponse(503, [("Retry-After", "1")], b'{"error": "busy"}')
        return MockResponse(200, [("Content-Type", "application/json")], b'{"ok": true}')

    async with gateway(handler) as (url, _, upstream), aiohttp.ClientSession() as client:
        async with client.post(f"{url}/v1/completions", data=b'{"prompt": "x"}') as response:
            assert response.status == 200
            assert await response.json() == {"ok": True}
            assert response.headers["X-Infergate-Replica"] != first[0]
        tried = [r.replica_url for r in upstream.requests]
        assert len(tried) == 2 and tried[0] != tried[1]
        assert [r.body for r in upstream.requests] == [b'{"prompt": "x"}'] * 2
        refused, served = upstream.responses
        assert refused.closed and served.released  # never is a connection both kept and cut


async def test_connect_errors_everywhere_end_in_one_502_naming_a_replica() -> None:
    def refuse(request: UpstreamRequest) -> MockResponse:
        raise UpstreamFailure("connect_error", "connection refused")

    async with gateway(refuse) as (url, live, upstream), aiohttp.ClientSession() as client:
        async with client.get(f"{url}/v1/models") as response:
            assert response.status == 502
            error = (await response.json())["error"]
            assert "refused the connection" in error["message"]
            assert any(u in error["message"] for u in URLS)
        assert len(upstream.requests) == 2  # each replica once: no untried one is left
        assert all(r.consecutive_failures == 1 for r in live.pool.all())


async def test_a_429_everywhere_is_relayed_as_the_replicas_own_answer() -> None:
    def busy(request: UpstreamRequest) -> MockResponse:
        headers = [("Retry-After", "7"), ("Content-Type", "application/json")]
        return MockResponse(429, headers, b'{"error": {"message": "slow down"}}')

    async with gateway(busy) as (url, live, upstream), aiohttp.ClientSession() as client:
        async with client.get(f"{url}/x") as response:
            assert response.status == 429
            assert response.headers["Retry-After"] == "7"
            assert (await response.json())["error"]["message"] == "slow down"
        assert len(upstream.requests) == 2
        assert all(r.consecutive_failures == 0 for r in live.pool.all())  # a refusal, not a fault


async def test_a_failure_not_in_retry_on_is_not_retried() -> None:
    def reset(request: UpstreamRequest) -> MockResponse:
        raise UpstreamFailure("reset", "connection closed before the response headers")

    retries = {"retry_on": ["connect_error"]}
    async with gateway(reset, retries=retries) as (url, _, upstream), aiohttp.ClientSession() as c:
        async with c.get(f"{url}/x") as response:
            assert response.status == 502
        assert len(upstream.requests) == 1


async def test_a_stream_that_fails_mid_body_is_cut_after_an_sse_error_event() -> None:
    def stream(request: UpstreamRequest) -> MockResponse:
        body = [b"data: one\n\n", UpstreamFailure("reset", "connection closed mid-body")]
        return MockResponse(200, [("Content-Type", "text/event-stream")], body)

    async with gateway(stream) as (url, live, upstream), aiohttp.ClientSession() as client:
        received = b""
        async with client.get(f"{url}/v1/stream") as response:
            assert response.status == 200  # the head had reached the client: it cannot change
            with pytest.raises(aiohttp.ClientPayloadError):
                async for data in response.content.iter_any():
                    received += data
        assert received.startswith(b"data: one\n\n")
        assert b"event: error" in received and b"mid-body" in received
        assert len(upstream.requests) == 1  # bytes reached the client: no retry
        assert upstream.responses[0].closed and not upstream.responses[0].released
        assert sum(r.consecutive_failures for r in live.pool.all()) == 1


async def test_a_whole_body_is_relayed_with_hop_by_hop_headers_dropped_both_ways() -> None:
    def answer(request: UpstreamRequest) -> MockResponse:
        headers = [("Connection", "X-Private"), ("X-Private", "1"), ("X-Kept", "2")]
        return MockResponse(200, headers, b"hello")

    async with gateway(answer) as (url, _, upstream), aiohttp.ClientSession() as client:
        sent = {"Connection": "X-Client-Only", "X-Client-Only": "a", "X-Request-Id": "r-1"}
        async with client.post(f"{url}/echo?q=1", data=b"body", headers=sent) as response:
            assert response.status == 200 and await response.read() == b"hello"
            assert response.headers["X-Kept"] == "2" and "X-Private" not in response.headers
            assert response.headers["X-Request-Id"] == "r-1"
            assert response.headers["X-Infergate-Replica"] in URLS
        (request,) = upstream.requests
        names = {name.lower(): value for name, value in request.headers}
        assert (request.method, request.path_qs, request.body) == ("POST", "/echo?q=1", b"body")
        assert "x-client-only" not in names and names["x-request-id"] == "r-1"
        assert names["x-forwarded-for"] == "127.0.0.1"
        assert upstream.responses[0].released
