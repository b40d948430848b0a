"""What the gateway costs: direct-vs-gateway latency at fixed request rates, and the highest
rate one gateway process sustains, against a no-op upstream on loopback.

    .venv/bin/python -m loadtests.gateway_overhead [--rates 250,500,1000,2000] [--seconds 5]
        [--workers 1]

Three processes share the machine: a no-op aiohttp upstream, the gateway (`python -m gateway`,
uvloop) and this load generator. Fixed-rate runs are open loop: request i is due at
t0 + i/rate and its latency is counted from when it was due, so a stalled server cannot hide
queueing (no coordinated omission). Percentiles come from the raw samples. The peak rate uses
`wrk` (closed loop, keep-alive) when it is installed, else this generator in closed loop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web

from loadtests.analysis.stats import percentile


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def serve_noop(port: int) -> None:
    async def ok(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=b'{"ok":true}', content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", ok)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, loop=_loop())


def _loop() -> asyncio.AbstractEventLoop:
    import uvloop

    return uvloop.new_event_loop()


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
    """Latencies (s) of requests sent at a fixed rate, and how many failed."""
    latencies: list[float] = []
    errors = 0
    # A bounded pool: past it requests wait in the client, which still counts against them
    # (latency runs from when a request was due), without thousands of sockets piling up.
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector) as client:
        # perf_counter, not loop.time(): uvloop's clock ticks in whole milliseconds.
        start = time.perf_counter() + 0.05

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
    return sorted(latencies), errors


async def closed_loop(url: str, concurrency: int, seconds: float) -> float:
    done = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds

        async def worker() -> None:
            nonlocal done
            while loop.time() < end:
                async with client.get(url) as response:
                    await response.read()
                done += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / seconds


def wrk_rate(url: str, seconds: float, connections: int) -> float:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{round(seconds)}s", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert match, out
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        print(f"    wrk saw {non2xx.group(1)} non-2xx responses", flush=True)
    return float(match.group(1))


@contextlib.contextmanager
def processes(workdir: Path, workers: int) -> Iterator[tuple[str, str]]:
    """A no-op upstream and a gateway (`workers` processes) in front of it; yields (direct URL,
    gateway URL)."""
    up_port, gw_port = free_port(), free_port()
    config = {
        "workers": workers,
        "listen": {"host": "127.0.0.1", "port": gw_port},
        "routing": {"strategy": "least_outstanding_requests"},
        "replicas": [{"url": f"http://127.0.0.1:{up_port}"}],
        "reload": {"watch": False},
    }
    path = workdir / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    me = [sys.executable, "-m", "loadtests.gateway_overhead"]
    procs = [
        subprocess.Popen([*me, "--serve-noop", str(up_port)]),
        subprocess.Popen(
            [sys.executable, "-m", "gateway", "-c", str(path), "--log-level", "warning"]
        ),
    ]
    try:
        yield f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{gw_port}"
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


def report(name: str, rate: float, samples: list[float], errors: int) -> dict[str, float]:
    p50, p99 = percentile(samples, 50) * 1e3, percentile(samples, 99) * 1e3
    print(
        f"  {name:8s} {rate:6.0f} req/s  n={len(samples):6d}  errors={errors}  "
        f"p50={p50:7.3f} ms  p99={p99:7.3f} ms",
        flush=True,
    )
    return {"p50": p50, "p99": p99}


async def latency_runs(args: argparse.Namespace) -> None:
    with (
        tempfile.TemporaryDirectory() as tmp,
        processes(Path(tmp), args.workers) as (direct, gateway),
    ):
        await wait_up(f"{direct}/ping")
        await wait_up(f"{gateway}/healthz")
        await open_loop(f"{gateway}/warmup", 200, 1.0)
        print(
            f"fixed-rate latency, workers: {args.workers}, {args.seconds:.0f} s per run "
            "(open loop):"
        )
        for rate in args.rates:
            d = report("direct", rate, *await open_loop(f"{direct}/x", rate, args.seconds))
            g = report("gateway", rate, *await open_loop(f"{gateway}/x", rate, args.seconds))
            added = f"p50 +{g['p50'] - d['p50']:.3f} ms, p99 +{g['p99'] - d['p99']:.3f} ms"
            print(f"  added by the gateway at {rate:.0f} req/s: {added}")


async def peak_runs(args: argparse.Namespace) -> None:
    """Fresh processes, a warm-up, then the closed-loop rate (wrk when installed)."""
    print(
        f"peak rate, workers: {args.workers}, {args.seconds:.0f} s closed loop, "
        f"{args.connections} connections:"
    )
    with (
        tempfile.TemporaryDirectory() as tmp,
        processes(Path(tmp), args.workers) as (direct, gateway),
    ):
        await wait_up(f"{direct}/ping")
        await wait_up(f"{gateway}/healthz")
        for name, base in (("direct", direct), ("gateway", gateway)):
            if shutil.which("wrk"):
                wrk_rate(f"{base}/x", 3, args.connections)  # warm-up
                rate = wrk_rate(f"{base}/x", args.seconds, args.connections)
                tool = "wrk"
            else:
                await closed_loop(f"{base}/x", args.connections, 3)
                rate = await closed_loop(f"{base}/x", args.connections, args.seconds)
                tool = "python"
            print(f"  {name:8s} {rate:8.0f} req/s ({tool})", flush=True)


async def main_async(args: argparse.Namespace) -> None:
    await latency_runs(args)
    await peak_runs(args)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.gateway_overhead", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--rates", default="250,500,1000,1500")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1, help="the gateway's `workers`")
    parser.add_argument("--serve-noop", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_noop:
        serve_noop(args.serve_noop)
        return
    args.rates = [float(r) for r in args.rates.split(",")]
    runner = asyncio.Runner(loop_factory=_loop)
    with runner:
        runner.run(main_async(args))


if __name__ == "__main__":
    main()
