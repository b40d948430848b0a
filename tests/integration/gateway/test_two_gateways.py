"""Two gateway processes in front of the same replicas: with only its own counts each gateway
balances its own requests, and together they pile onto the same replicas by chance; with
load feedback (`least_loaded`) each also sees the other's requests and the fleet stays even.

Real processes on loopback: 4 simulated replicas, 2 gateways, 4 closed-loop users (2 per
gateway) each sending 1-second completions back to back. The test samples every replica's
GET /load and compares the spread (busiest minus idlest) between the two strategies.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml

from gateway.cluster import ClusterConfig, replica_urls, replicas_running, wait_ready
from tests.support.processes import free_port, stop, wait_http_ok

REPLICAS = 4
USERS_PER_GATEWAY = 2
RUN_S = 6.0
BODY = {"model": "tiny-gpt", "prompt": "two gateways", "temperature": 0}


@pytest.fixture(scope="module")
def replicas() -> Iterator[list[str]]:
    cluster = ClusterConfig(
        replicas=REPLICAS, engine="simulated", first_replica_port=free_port_block(),
        kv_events_port=None,
    )  # fmt: skip
    urls = replica_urls(cluster)
    with replicas_running(cluster, output=subprocess.DEVNULL) as procs:
        asyncio.run(wait_ready(urls, procs))
        yield urls


def free_port_block() -> int:
    from loadtests.harness.runner import free_port_block as block

    return block(REPLICAS, start=31000)


@contextlib.asynccontextmanager
async def gateways(tmp: Path, urls: list[str], strategy: str) -> AsyncIterator[list[str]]:
    """Two gateway processes with this strategy, each polling /load every 0.1 s."""
    procs: list[subprocess.Popen[bytes]] = []
    listen: list[str] = []
    try:
        for name in ("a", "b"):
            port = free_port()
            config = {
                "listen": {"port": port},
                "routing": {"strategy": strategy},
                "replicas": [{"url": url} for url in urls],
                "load_feedback": {"poll_interval_s": 0.1},
                "reload": {"watch": False},
            }
            path = tmp / f"gateway-{name}-{strategy}.yaml"
            path.write_text(yaml.safe_dump(config))
            cmd = [sys.executable, "-m", "gateway", "-c", str(path), "--log-level", "warning"]
            procs.append(subprocess.Popen(cmd))
            listen.append(f"http://127.0.0.1:{port}")
        for url, proc in zip(listen, procs, strict=True):
            await wait_http_ok(f"{url}/readyz", proc)
        yield listen
    finally:
        for proc in procs:
            assert stop(proc) == 0


async def test_least_loaded_keeps_two_gateways_fleet_even_where_local_counts_do_not(
    replicas: list[str], tmp_path: Path
) -> None:
    spreads = {}
    for strategy in ("least_outstanding_requests", "least_loaded"):
        async with gateways(tmp_path, replicas, strategy) as urls:
            spreads[strategy] = await _run(urls, replicas)
    local = statistics.fmean(spreads["least_outstanding_requests"])
    fed = statistics.fmean(spreads["least_loaded"])
    print(f"mean spread: local counts {local:.2f}, least_loaded {fed:.2f}")
    # 4 requests on 4 replicas: ideal is 1 each (spread 0). Two gateways that each place their
    # 2 requests blind to the other's collide 5 times in 6: expected spread about 1.7. Over the
    # 4 s sampled (about four requests per user) it varies: 1.3 to 1.9 in most runs, 0.8 once
    # on a loaded machine; 0.5 is far below any run seen, and still plainly not an even fleet.
    assert fed <= 0.5, spreads["least_loaded"]
    assert local >= 0.5 and local >= 3 * fed, (local, fed)


async def _user(client: aiohttp.ClientSession, url: str, stop_at: float, seed: int) -> int:
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    done = 0
    while loop.time() < stop_at:
        body = BODY | {"max_tokens": rng.randint(16, 48)}  # users out of step, as in life
        async with client.post(f"{url}/v1/completions", json=body) as response:
            assert response.status == 200, await response.text()
            await response.read()
        done += 1
    return done


async def _sample_spread(
    client: aiohttp.ClientSession, urls: list[str], stop_at: float
) -> list[int]:
    loop = asyncio.get_running_loop()
    spreads = []
    await asyncio.sleep(1.0)  # let every user have a request in flight
    while loop.time() < stop_at - 1.0:
        loads = []
        for url in urls:
            async with client.get(f"{url}/load") as response:
                loads.append((await response.json())["inflight"])
        spreads.append(max(loads) - min(loads))
        await asyncio.sleep(0.05)
    return spreads


async def _run(gateways: list[str], urls: list[str]) -> list[int]:
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + RUN_S
    async with aiohttp.ClientSession() as client:
        users = [
            _user(client, gw, stop_at, seed=i * 10 + j)
            for i, gw in enumerate(gateways)
            for j in range(USERS_PER_GATEWAY)
        ]
        spreads, *done = await asyncio.gather(_sample_spread(client, urls, stop_at), *users)
    assert all(n >= 2 for n in done), done
    return spreads
