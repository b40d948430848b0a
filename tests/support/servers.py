"""Real loopback servers for tests: a fake replica whose behaviour each test steers, and the
gateway app started on an ephemeral port. Nothing here mocks our own components."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gateway.app.front import FrontSite, gateway_runner
from gateway.app.server import create_app
from gateway.config import load_config
from gateway.ops.metrics import METRICS, GatewayMetrics
from gateway.pool.live import LIVE, Live


@dataclass
class FakeReplica:
    """What the fake replica saw, and the knobs a test turns."""

    name: str
    url: str = ""
    seen: list[dict[str, Any]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    healthy: bool = True
    in_flight: int = 0
    peak: int = 0  # the most requests it held at once (/sleep and /hold)


def fake_replica_app(replica: FakeReplica) -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        record = {
            "method": request.method,
            "path": request.path,
            "raw_path": request.raw_path,
            "headers": dict(request.headers),
            "body": body.decode("utf-8", "replace"),
        }
        replica.seen.append(record)
        return web.json_response({"replica": replica.name, **record})

    async def ping(request: web.Request) -> web.Response:
        return web.json_response({"ok": replica.healthy}, status=200 if replica.healthy else 503)

    async def load(request: web.Request) -> web.Response:
        return web.json_response({"inflight": replica.in_flight})

    async def sleep(request: web.Request) -> web.Response:
        replica.in_flight += 1
        replica.peak = max(replica.peak, replica.in_flight)
        try:
            await asyncio.sleep(float(request.query.get("s", "0.1")))
        finally:
            replica.in_flight -= 1
        return web.json_response({"replica": replica.name})

    async def hold(request: web.Request) -> web.Response:
        """Answers only when the test sets `release`."""
        replica.in_flight += 1
        replica.peak = max(replica.peak, replica.in_flight)
        try:
            await replica.release.wait()
        finally:
            replica.in_flight -= 1
        return web.json_response({"replica": replica.name})

    async def sse(request: web.Request) -> web.StreamResponse:
        """n events `interval` apart; with gate=1 the second event waits for `release`."""
        n = int(request.query.get("n", "3"))
        interval = float(request.query.get("interval", "0"))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(n):
            if i == 1 and request.query.get("gate") == "1":
                await replica.release.wait()
            await response.write(f"data: {json.dumps({'i': i})}\n\n".encode())
            await asyncio.sleep(interval)
        if request.query.get("cut") == "1":
            assert request.transport is not None
            request.transport.abort()
            return response
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def no_model_list(request: web.Request) -> web.Response:
        return web.json_response({"error": "no model list here"}, status=404)

    app = web.Application()
    app.router.add_get("/ping", ping)
    app.router.add_get("/v1/models", no_model_list)  # serves anything (as before model routing)
    app.router.add_get("/load", load)
    app.router.add_route("*", "/sleep", sleep)
    app.router.add_route("*", "/hold", hold)
    app.router.add_route("*", "/sse", sse)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


@asynccontextmanager
async def serve(app: web.Application, port: int = 0, host: str = "127.0.0.1") -> AsyncIterator[str]:
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server
    assert server is not None
    sockets = getattr(server, "sockets", None) or []
    bound_port = sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound_port}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def serve_gateway(app: web.Application, host: str = "127.0.0.1") -> AsyncIterator[str]:
    """A gateway app as `infergate gateway` serves it: the lean front before aiohttp's server."""
    config = app[LIVE].runtime.config
    runner, front = gateway_runner(app, config, shutdown_s=1)
    await runner.setup()
    front.ready(runner)
    site = FrontSite(runner, front, host=host, port=0)
    await site.start()
    try:
        yield site.name
    finally:
        await runner.cleanup()


@asynccontextmanager
async def fake_replicas(n: int) -> AsyncIterator[list[FakeReplica]]:
    replicas = [FakeReplica(f"r{i}") for i in range(n)]
    async with _serve_all(replicas):
        yield replicas


@asynccontextmanager
async def _serve_all(replicas: list[FakeReplica]) -> AsyncIterator[None]:
    if not replicas:
        yield
        return
    first, rest = replicas[0], replicas[1:]
    async with serve(fake_replica_app(first)) as url:
        first.url = url
        async with _serve_all(rest):
            yield
        first.release.set()  # let held handlers finish so shutdown is quick


def write_config(path: Path, config: dict[str, Any]) -> None:
    """Write atomically, as editors and Kubernetes ConfigMap updates do."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(config))
    tmp.replace(path)


def gateway_config(replicas: list[FakeReplica], strategy: str, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "routing": {"strategy": strategy},
        "replicas": [{"url": r.url} for r in replicas],
        "reload": {"poll_interval_s": 0.1},
    }
    config.update(extra)
    return config


@dataclass
class Gateway:
    url: str
    state: Live  # the gateway in force: its runtime, pool and admission
    config_path: Path
    app: web.Application
    metrics: GatewayMetrics


@asynccontextmanager
async def running_gateway(
    config_path: Path, admin_token: str | None = None
) -> AsyncIterator[Gateway]:
    config = load_config(config_path)
    app = create_app(
        config, config_path=config_path, admin_token=admin_token, registry=CollectorRegistry()
    )
    async with serve_gateway(app) as url:
        state = app[LIVE]
        await wait_until(lambda: state.models_polled)  # as /readyz waits for it
        yield Gateway(url, state, config_path, app, app[METRICS])
        await _settle(state)
        leftover = {
            r.url: (r.outstanding, r.outstanding_tokens)
            for r in state.pool.all()
            if r.outstanding or r.outstanding_tokens
        }
        assert not leftover, f"outstanding counts not back to zero: {leftover}"


async def _settle(state: Live, timeout_s: float = 5.0) -> None:
    """Wait (bounded) for handlers of disconnected clients to run their finally blocks."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while any(r.outstanding for r in state.pool.all()) and loop.time() < deadline:
        await asyncio.sleep(0.01)


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Bounded wait for a condition a test cannot await directly."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def get_json(
    client: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """GET a JSON object that must come with a 200."""
    async with client.get(url, headers=headers) as response:
        assert response.status == 200, await response.text()
        body: dict[str, Any] = await response.json()
        return body


def lines_done(batch: dict[str, Any]) -> int:
    """A batch's lines that have ended, from its JSON."""
    counts = batch["request_counts"]
    return int(counts["completed"] + counts["failed"])


async def metric_sum(client: aiohttp.ClientSession, url: str, name: str, **labels: str) -> float:
    """The sum of the samples named `name` with these labels on `url`/metrics."""
    async with client.get(f"{url}/metrics") as response:
        text = await response.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )
