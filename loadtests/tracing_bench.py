"""What tracing costs the gateway: the same load with `tracing:` off and on (each of
`--sample-ratios`; 1.0: every request traced and exported), against a no-op upstream on loopback.

    python -m loadtests.tracing_bench [--rounds 3] [--seconds 3] [--rate 300] [--connections 16]
        [--sample-ratios 1.0,0.1] [--out loadtests/results/tracing]

Three processes share the machine: a helper serving a no-op upstream (a small JSON answer) and
an OTLP/HTTP sink that decodes and counts the spans it receives, the gateway (`python -m
gateway`, one worker) and this load generator (open and closed loops as
loadtests/gateway_overhead.py runs them). Each round starts a fresh gateway per mode, off then
each ratio, and measures the peak rate (closed loop, `--connections` at once) and the latency
at a fixed rate (open loop, counted from when each request was due). The peak is the median over
rounds with their range; percentiles come from the raw samples of every round of a mode. The
sink's count says the spans were really made and sent.

With `--out`, the folder gets table.md and command.txt (the full command).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
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
from loadtests.harness.plan import spelled_out

PROG = "python -m loadtests.tracing_bench"
SECTION = "Tracing cost"


@dataclass
class Measured:
    """One mode's measurements over every round."""

    rates: list[float] = field(default_factory=list)  # peak req/s, one a round
    samples: list[float] = field(default_factory=list)  # latencies (s) at the fixed rate
    errors: int = 0
    spans: int = 0  # spans the sink received


def modes(args: argparse.Namespace) -> list[float | None]:
    """None: tracing off; else the sample ratio."""
    return [None, *(float(r) for r in args.sample_ratios.split(","))]


def label(mode: float | None) -> str:
    return "off" if mode is None else f"on (sample_ratio {mode})"


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
def gateway(workdir: Path, upstream: str, sink: str, ratio: float | None) -> Iterator[str]:
    """A gateway in front of `upstream`, tracing `ratio` of the requests to `sink` (None: off)."""
    port = free_port()
    config = {
        "listen": {"host": "127.0.0.1", "port": port},
        "routing": {"strategy": "least_outstanding_requests"},
        "replicas": [{"url": upstream}],
        "load_feedback": {"poll_interval_s": 0},
        "reload": {"watch": False},
    }
    if ratio is not None:
        config["tracing"] = {"otlp_endpoint": f"{sink}/v1/traces", "sample_ratio": ratio}
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
    results: dict[float | None, Measured],
) -> None:
    for mode in modes(args):
        before = await spans_received(sink)
        with gateway(workdir, upstream, sink, mode) as url:
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
            f"  {label(mode):24s} peak {rate:6.0f} req/s   at {args.rate:.0f} req/s: "
            f"p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  errors {errors}  spans {sent}",
            flush=True,
        )


def report(args: argparse.Namespace, results: dict[float | None, Measured], load: float) -> str:
    """What ran, then the section README copies: one row a mode."""
    rate = f"{args.rate:g} req/s"
    lines = [
        f"Machine: {os.cpu_count()} cores, shared by this load generator, one helper process "
        "(the no-op upstream, an aiohttp app answering a small JSON body, and the OTLP/HTTP sink, "
        "which decodes every export and counts its spans) and the gateway: `python -m gateway`, "
        "one worker, `least_outstanding_requests` over that one upstream; other work on the "
        f"machine: load average {load:.2f} as the run began. {args.rounds} rounds; each starts "
        "a fresh gateway per mode and measures the peak rate for "
        f"{args.seconds:g} s (closed loop, {args.connections} connections, after 1 s of "
        f"warm-up), then {args.seconds:g} s at {rate} (open loop, each request timed from when "
        "it was due).",
        "",
        f"### {SECTION}",
        "",
        f"| tracing | peak req/s, median [range] | P50 ms at {rate} | P99 ms at {rate} | "
        "spans received |",
        "|---|---|---|---|---|",
    ]
    for mode, r in results.items():
        rates = sorted(r.rates)
        peak = f"{rates[len(rates) // 2]:,.0f} [{rates[0]:,.0f}, {rates[-1]:,.0f}]"
        p50, p99 = percentile(r.samples, 50) * 1e3, percentile(r.samples, 99) * 1e3
        lines.append(f"| {label(mode)} | {peak} | {p50:.2f} | {p99:.2f} | {r.spans:,} |")
    failed = sum(r.errors for r in results.values())
    lines += [
        "",
        f"Peak: over {args.rounds} rounds; P50/P99: the raw samples of every round pooled. "
        f"Failed requests: {failed}.",
    ]
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> str:
    started = time.monotonic()
    load = os.getloadavg()[0]
    results = {mode: Measured() for mode in modes(args)}
    with tempfile.TemporaryDirectory() as tmp, helpers() as (upstream, sink):
        await wait_up(f"{upstream}/ping")  # any path answers
        await wait_up(f"{sink}/count")
        for number in range(args.rounds):
            print(f"round {number + 1} of {args.rounds}:", flush=True)
            await one_round(args, Path(tmp), upstream, sink, results)
    print(f"({time.monotonic() - started:.0f} s in all)")
    return report(args, results, load)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="each measurement")
    parser.add_argument("--rate", type=float, default=300.0, help="the open loop's req/s")
    parser.add_argument("--connections", type=int, default=16, help="the closed loop's")
    parser.add_argument("--sample-ratios", default="1.0,0.1", help="the modes with tracing on")
    parser.add_argument("--out", type=Path, help="folder for table.md and command.txt")
    parser.add_argument("--serve-helpers", help=argparse.SUPPRESS)  # UPSTREAM_PORT,SINK_PORT
    return parser


def command_of(args: argparse.Namespace) -> str:
    return spelled_out(PROG, parser(), args)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    with asyncio.Runner(loop_factory=_loop) as runner:
        if args.serve_helpers:
            upstream_port, sink_port = (int(p) for p in args.serve_helpers.split(","))
            runner.run(serve_helpers(upstream_port, sink_port))
            return
        table = runner.run(main_async(args))
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        command = command_of(args)
        (args.out / "command.txt").write_text(command + "\n")
        (args.out / "table.md").write_text(f"Command: `{command}`\n\n{table}\n")


if __name__ == "__main__":
    main()
