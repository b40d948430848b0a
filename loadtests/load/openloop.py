"""Open-loop load: completion requests arrive as a Poisson process at a fixed mean rate,
whatever the latency (unlike Locust's closed-loop users, which wait for each answer).

    python -m loadtests.load.openloop --host http://127.0.0.1:8080 --rate 20 --seconds 60 \\
        --samples samples.csv

The request stream comes from the same seeded workload as the Locust users; samples are
written in the same CSV format (loadtests/load/samples.py).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time

import aiohttp

from loadtests.load.samples import Sample, write_samples
from loadtests.load.sse import StreamCheck
from loadtests.load.workload import CompletionRequest, Workload, draw, user_rng


async def one(
    client: aiohttp.ClientSession, host: str, workload: Workload, request: CompletionRequest
) -> Sample:
    start_unix, t0 = time.time(), time.perf_counter()
    ttft: float | None = None
    tokens, status, ok, replica = 0, 0, False, ""
    body = request.body(workload.model, workload.seed)
    kind = "completion_stream" if request.stream else "completion"
    try:
        async with client.post(f"{host}/v1/completions", json=body) as response:
            status = response.status
            replica = response.headers.get("X-Infergate-Replica", "")
            if status == 200 and not request.stream:
                tokens = (await response.json())["usage"]["completion_tokens"]
                ok = True
            elif status == 200:
                check = StreamCheck()  # ok only with `[DONE]` and no error event
                async for line in response.content:
                    if check.feed(line) and ttft is None:
                        ttft = time.perf_counter() - t0
                    if check.done:
                        break
                tokens, ok = check.tokens, check.ok
            else:
                await response.read()
    except (aiohttp.ClientError, TimeoutError):
        ok = False
    latency = time.perf_counter() - t0
    return Sample(
        start_unix, start_unix + latency, kind, ok, status, latency, ttft, tokens, replica
    )


async def run(host: str, rate: float, seconds: float, workload: Workload) -> list[Sample]:
    """`host`: one URL, or several joined by commas: each arrival goes to one drawn at random
    (as a Kubernetes Service spreads connections over gateway pods)."""
    hosts = host.split(",")
    pick = random.Random(f"hosts:{workload.seed}")
    arrivals = random.Random(f"arrivals:{workload.seed}")
    requests = user_rng(workload, 0)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as client:
        tasks: list[asyncio.Task[Sample]] = []
        start = time.perf_counter()
        due = 0.0
        while True:
            due += arrivals.expovariate(rate)
            if due > seconds:
                break
            delay = start + due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            request = draw(workload, requests)
            target = hosts[pick.randrange(len(hosts))] if len(hosts) > 1 else host
            tasks.append(asyncio.create_task(one(client, target, workload, request)))
        return list(await asyncio.gather(*tasks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--rate", type=float, required=True, help="mean requests per second")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--samples", required=True)
    args = parser.parse_args()
    samples = asyncio.run(run(args.host, args.rate, args.seconds, Workload.from_env()))
    write_samples(args.samples, samples)


if __name__ == "__main__":
    main()
