"""Two gateways on one PostgreSQL job store, as clients see them: their batches run on both,
fill only the replicas' job slots between them (the store counts every gateway's jobs at a
replica), read the same from either, and a cancel at one stops the work the other was doing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.servers import (
    FakeReplica,
    Gateway,
    fake_replicas,
    gateway_config,
    get_json,
    metric_sum,
    running_gateway,
    wait_until,
    write_config,
)

PER_REPLICA = 2  # jobs.max_outstanding_per_replica


async def _two_gateways(
    stack: AsyncExitStack, tmp_path: Path, store: str, replicas: list[FakeReplica], **jobs: Any
) -> list[Gateway]:
    gateways = []
    for name in ("a", "b"):
        config = gateway_config(
            replicas, "least_outstanding_requests",
            jobs={"store": store, "poll_interval_s": 0.01, "lease_s": 1.0, **jobs},
            load_feedback={"poll_interval_s": 0.05},
        )  # fmt: skip
        write_config(tmp_path / f"{name}.yaml", config)
        gateways.append(await stack.enter_async_context(running_gateway(tmp_path / f"{name}.yaml")))
    return gateways


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def _succeeded(client: aiohttp.ClientSession, url: str) -> float:
    """Jobs this gateway ran to success, from its /metrics."""
    return await metric_sum(client, url, "gateway_jobs_finished_total", status="succeeded")


def _lines(n: int, path: str) -> bytes:
    return "\n".join(
        json.dumps({"custom_id": f"c{i}", "url": path, "body": {"n": i}}) for i in range(n)
    ).encode()


async def test_two_gateways_share_their_batches_within_the_replicas_idle_capacity(
    tmp_path: Path, postgres_url: str, session: aiohttp.ClientSession
) -> None:
    async with fake_replicas(2) as replicas, AsyncExitStack() as stack:
        gateways = await _two_gateways(
            stack, tmp_path, postgres_url, replicas, max_outstanding_per_replica=PER_REPLICA
        )
        paths = []
        for gateway in gateways:  # one batch at each: both dispatch from the start
            data = _lines(30, "/sleep?s=0.15")
            async with session.post(f"{gateway.url}/v1/batches", data=data) as response:
                assert response.status == 202
                paths.append(response.headers["Location"])
        for path in paths:
            for _ in range(500):
                if (await get_json(session, gateways[1].url + path))["status"] == "completed":
                    break
                await asyncio.sleep(0.05)
        views = [[await get_json(session, g.url + path) for g in gateways] for path in paths]
        # A gateway counts a job in its /metrics just after the store has it finished, so a
        # batch may read completed a moment before the last job's count: wait that moment.
        for _ in range(100):
            ran = [await _succeeded(session, g.url) for g in gateways]
            if sum(ran) >= 60:
                break
            await asyncio.sleep(0.05)
    for a, b in views:  # either gateway reads either batch, the same
        assert a == b and a["status"] == "completed" and a["request_counts"]["completed"] == 30
    # Every job ran once. Which gateway ran it is a race for the replicas' idle slots (on a
    # loaded machine one gateway may win every slot), so no share is asserted.
    assert sum(ran) == 60
    # Each alone fills every replica to PER_REPLICA; blind to each other, the two would reach
    # twice that (they start in the same instant, before any load report): the store counts
    # every gateway's jobs at a replica.
    assert max(r.peak for r in replicas) == PER_REPLICA


async def test_a_cancel_at_one_gateway_stops_the_job_running_at_the_other(
    tmp_path: Path, postgres_url: str, session: aiohttp.ClientSession
) -> None:
    async with fake_replicas(1) as (replica,), AsyncExitStack() as stack:
        a, b = await _two_gateways(stack, tmp_path, postgres_url, [replica])
        async with session.post(f"{a.url}/v1/jobs", json={"url": "/hold", "body": {}}) as r:
            job = await r.json()
        await wait_until(lambda: replica.in_flight == 1)
        async with session.delete(f"{b.url}/v1/jobs/{job['id']}") as response:
            assert response.status == 200
            assert (await response.json())["status"] == "cancelled"
        # The gateway running it learns at its next lease renewal (lease_s / 3) and stops.
        await wait_until(lambda: replica.in_flight == 0, timeout_s=3)
        done = [await get_json(session, f"{g.url}/v1/jobs/{job['id']}") for g in (a, b)]
    assert [d["status"] for d in done] == ["cancelled", "cancelled"]
    assert done[0]["error"]["code"] == "cancelled"
