"""What tracing costs the gateway: the same load with `tracing:` off and on (sample_ratio 1.0,
every request traced and exported), against a no-op upstream on loopback.

    .venv/bin/python -m loadtests.tracing_bench [--rounds 2] [--seconds 3] [--rate 300]
        [--connections 16]

Three processes share the machine: a helper serving a no-op upstream (a small JSON answer) and
an OTLP/HTTP sink that decodes and counts the spans it receives, the gateway (`python -m
gateway`, one worker) and this load generator (open and closed loops as
loadtests/gateway_overhead.py runs them). Each round starts a fresh gateway per mode, off then on,
and measures the peak rate (closed loop, `--connections` at once) and the latency at a fixed
rate (open loop, counted from when each request was due). Percentiles come from the raw samples
of every round of a mode. The sink's count says the spans were really made and sent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web

from loadtests.analysis.stats import percentile

MODES = ("off", "on")


@dataclass
class Measured:
    """One mode's measurements over every round."""

    rates: list[float] = field(default_factory=list)  # peak req/s, one a round
    samples: list[float] = field(default_factory=list)  # latencies (s) at the fixed rate
    errors: int = 0
    spans: int = 0  # spans the sink received


def _loop() -> asyncio.AbstractEventLoop:
    import uvloop

    return uvloop.new_event_loop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def helper_apps() -> tuple[web.Application, web.Application]:
    """The no-op upstream, and the OTLP/HTTP sink: each export decoded and its spans counted
    (GET /count tells)."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    async def ok(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=b'{"ok":true}', content_type="application/json")

    counts = {"exports": 0, "spans": 0}

    async def traces(request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest()
        export.ParseFromString(await request.read())
        counts["exports"] += 1
        counts["spans"] += sum(
            len(scope.spans) for r in export.resource_spans for scope in r.scope_spans
        )
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def count(request: web.Request) -> web.Response:
        return web.json_response(counts)

    upstream, sink = web.Application(), web.Application()
    upstream.router.add_route("*", "/{tail:.*}", ok)
    sink.router.add_post("/v1/traces", traces)
    sink.router.add_get("/count", count)
    return upstream, sink


async def serve_helpers(upstream_port: int, sink_port: int) -> None:
    runners = []
    for app, port in zip(helper_apps(), (upstream_port, sink_port), strict=True):
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
    await asyncio.Event().wait()  # until terminated


async def wait_up(url: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as client:
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with client.get(url) as response:
                    if response.status < 500:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up")
            await asyncio.sleep(0.05)


async def open_loop(url: str, rate: float, seconds: float) -> tuple[list[float], int]:
    """Latencies (s) of requests due at a fixed rate, counted from when each was due (no
    coordinated omission), and how many failed."""
    latencies: list[float] = []
    errors = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as client:
        start = time.perf_counter() + 0.05  # perf_counter: uvloop's clock ticks in whole ms

        async def one(due: float) -> None:
            nonlocal errors
            try:
                async with client.post(url, data=b'{"x":1}') as response:
                    await response.read()
                    if response.status != 200:
                        errors += 1
                        return
            except aiohttp.ClientError:
                errors += 1
                return
            latencies.append(time.perf_counter() - due)

        tasks = []
        for i in range(int(rate * seconds)):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(due)))
        await asyncio.gather(*tasks)
    return latencies, errors


async def closed_loop(url: str, connections: int, seconds: float) -> float:
    """Requests per second with `connections` each sending the next as the last returns."""
    done = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
        end = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < end:
                async with client.post(url, data=b'{"x":1}') as response:
                    await response.read()
                done += 1

        await asyncio.gather(*(worker() for _ in range(connections)))
    return done / seconds


@contextlib.contextmanager
def gateway(workdir: Path, upstream: str, sink: str | None) -> Iterator[str]:
    """A gateway in front of `upstream`, tracing to `sink` when one is given."""
    port = free_port()
    config = {
        "listen": {"host": "127.0.0.1", "port": port},
        "routing": {"strategy": "least_outstanding_requests"},
        "replicas": [{"url": upstream}],
        "load_feedback": {"poll_interval_s": 0},
        "reload": {"watch": False},
    }
    if sink is not None:
        config["tracing"] = {"otlp_endpoint": f"{sink}/v1/traces", "sample_ratio": 1.0}
    path = workdir / f"gateway-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "gateway", "-c", str(path), "--log-level", "warning"]
    proc = subprocess.Popen(command)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()  # drains, and a tracing gateway sends the spans it still holds
        proc.wait(30)


@contextlib.contextmanager
def helpers() -> Iterator[tuple[str, str]]:
    """The no-op upstream and the OTLP sink, in a process of their own; yields their URLs."""
    up_port, sink_port = free_port(), free_port()
    me = [sys.executable, "-m", "loadtests.tracing_bench"]
    proc = subprocess.Popen([*me, "--serve-helpers", f"{up_port},{sink_port}"])
    try:
        yield f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{sink_port}"
    finally:
        proc.terminate()
        proc.wait(10)


async def spans_received(sink: str) -> int:
    async with aiohttp.ClientSession() as client, client.get(f"{sink}/count") as response:
        return int((await response.json())["spans"])


async def one_round(
    args: argparse.Namespace,
    workdir: Path,
    upstream: str,
    sink: str,
    results: dict[str, Measured],
) -> None:
    for mode in MODES:
        before = await spans_received(sink)
        with gateway(workdir, upstream, sink if mode == "on" else None) as url:
            await wait_up(f"{url}/healthz")
            await closed_loop(f"{url}/warmup", args.connections, 1.0)
            rate = await closed_loop(f"{url}/x", args.connections, args.seconds)
            samples, errors = await open_loop(f"{url}/x", args.rate, args.seconds)
        sent = await spans_received(sink) - before  # the gateway has exited: all are sent
        mine = results[mode]
        mine.rates.append(rate)
        mine.samples.extend(samples)
        mine.errors += errors
        mine.spans += sent
        p50, p99 = percentile(samples, 50) * 1e3, percentile(samples, 99) * 1e3
        print(
            f"  tracing {mode:3s}  peak {rate:7.0f} req/s   at {args.rate:.0f} req/s: "
            f"p50 {p50:6.3f} ms  p99 {p99:6.3f} ms  errors {errors}  spans sent {sent}",
            flush=True,
        )


def summary(args: argparse.Namespace, results: dict[str, Measured]) -> None:
    print(
        f"\nsummary ({args.rounds} rounds, no-op upstream, 1 gateway worker; peak: mean of "
        f"rounds; latency: pooled raw samples at {args.rate:.0f} req/s):"
    )
    print("| tracing | peak req/s | p50 ms | p99 ms | errors | spans sent |")
    print("|---|---|---|---|---|---|")
    rows = {}
    for mode in MODES:
        r = results[mode]
        peak = sum(r.rates) / len(r.rates)
        p50, p99 = percentile(r.samples, 50) * 1e3, percentile(r.samples, 99) * 1e3
        rows[mode] = (peak, p50, p99)
        print(f"| {mode} | {peak:.0f} | {p50:.3f} | {p99:.3f} | {r.errors} | {r.spans} |")
    (off_peak, off_p50, off_p99), (on_peak, on_p50, on_p99) = rows["off"], rows["on"]
    print(
        f"\ntracing on: peak {100 * (on_peak / off_peak - 1):+.1f}%, "
        f"p50 {on_p50 - off_p50:+.3f} ms, p99 {on_p99 - off_p99:+.3f} ms"
    )


async def main_async(args: argparse.Namespace) -> None:
    started = time.monotonic()
    results = {mode: Measured() for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp, helpers() as (upstream, sink):
        await wait_up(f"{upstream}/ping")  # any path answers
        await wait_up(f"{sink}/count")
        print(
            f"tracing off vs on (sample_ratio 1.0), {args.seconds:.0f} s per measurement, "
            f"{args.connections} connections closed loop, {args.rate:.0f} req/s open loop:"
        )
        for _ in range(args.rounds):
            await one_round(args, Path(tmp), upstream, sink, results)
    summary(args, results)
    print(f"({time.monotonic() - started:.0f} s in all)")


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.tracing_bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rate", type=float, default=300.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--serve-helpers", help=argparse.SUPPRESS)  # UPSTREAM_PORT,SINK_PORT
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=_loop) as runner:
        if args.serve_helpers:
            upstream_port, sink_port = (int(p) for p in args.serve_helpers.split(","))
            runner.run(serve_helpers(upstream_port, sink_port))
        else:
            runner.run(main_async(args))


if __name__ == "__main__":
    main()
