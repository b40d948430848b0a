"""A key's limits held across two real gateways that lease them from one PostgreSQL database
(`flow_control.store`), in front of an inline OpenAI-style replica: clients alternating between
the gateways get the key's limit once, where the same two gateways without the store let it
through twice; and when the database goes away, `allow` keeps serving from each gateway's own
clock, `deny` refuses with a 429 that says why, both count the failures, and both lease again
once it is back. Underneath, the store's own statements: leases at once from two gateways never
take more than the bucket holds, and what is handed back is there for the next lease."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.control.limits_store import Ask, LimitsStore
from loadtests.harness.pgserver import PostgresServer, fresh_database
from tests.support.openai_replica import Replica
from tests.support.servers import Gateway, running_gateway, serve, wait_until, write_config

KEY = "sk-shared-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
R = 40  # requests_per_minute: a slice of 5 % is 2


@asynccontextmanager
async def gateways(
    tmp_path: Path, flows: list[dict[str, Any] | None], rpm: int = R
) -> AsyncIterator[tuple[list[Gateway], Replica]]:
    """One gateway per entry of `flows` (its flow_control), all with one key of `rpm`."""
    replica = Replica()
    async with serve(replica.app()) as url, AsyncExitStack() as stack:
        started = []
        for i, flow in enumerate(flows):
            config: dict[str, Any] = {
                "replicas": [{"url": url, "models": ["m"]}],
                "reload": {"watch": False},
                "auth": {"api_keys": [{"name": "team-a", "key": KEY,
                                       "limits": {"requests_per_minute": rpm}}]},
            }  # fmt: skip
            if flow is not None:
                config["flow_control"] = flow
            write_config(tmp_path / f"g{i}.yaml", config)
            started.append(
                await stack.enter_async_context(running_gateway(tmp_path / f"g{i}.yaml"))
            )
        yield started, replica


async def complete(client: aiohttp.ClientSession, gw: Gateway) -> tuple[int, str]:
    payload = {"model": "m", "prompt": "hello", "max_tokens": 1}
    async with client.post(f"{gw.url}/v1/completions", json=payload, headers=AUTH) as r:
        body = await r.json()
        return r.status, "" if r.status == 200 else body["error"]["message"]


async def alternate(gws: list[Gateway], duration_s: float) -> list[tuple[int, str]]:
    """A client sending to each gateway in turn, for `duration_s`."""
    loop = asyncio.get_running_loop()
    deadline, answers = loop.time() + duration_s, []
    async with aiohttp.ClientSession() as client:
        while loop.time() < deadline:
            for gw in gws:
                answers.append(await complete(client, gw))
            await asyncio.sleep(0.005)
    return answers


def errors(gw: Gateway) -> float:
    value: float = gw.metrics.flow.store_errors._value.get()
    return value


async def test_leases_at_once_never_take_more_than_the_bucket_holds(postgres_url: str) -> None:
    stores = [LimitsStore(postgres_url), LimitsStore(postgres_url)]  # each makes the table
    loop = asyncio.get_running_loop()
    try:
        began = loop.time()
        asks = [Ask("k", "tokens", 6000, 700), Ask("j", "requests", 60, 1)]
        leases = await asyncio.gather(*(store.lease(asks) for store in stores for _ in range(5)))
        refill = 100 * (loop.time() - began)  # 6000 a minute
        assert 6000 <= sum(got["k", "tokens"] for got in leases) <= 6000 + refill
        assert [got["j", "requests"] for got in leases] == [1] * 10
        await stores[0].give_back([Ask("k", "tokens", 6000, 500)])
        again = (await stores[1].lease([Ask("k", "tokens", 6000, 1000)]))["k", "tokens"]
        assert 500 <= again <= 500 + 100 * (loop.time() - began)
        lowered = await stores[1].lease([Ask("j", "requests", 5, 100)])  # a reload lowered it
        assert lowered == {("j", "requests"): 5}
        assert await stores[0].lease([]) == {}  # a round trip that proves the store
    finally:
        for store in stores:
            await store.close()


async def test_two_gateways_sharing_a_store_let_the_limit_through_once(
    tmp_path: Path, postgres_url: str
) -> None:
    # Without the store each gateway keeps the limit alone: together they pass it twice.
    async with gateways(tmp_path, [None, None]) as (alone, _):
        statuses = [status for status, _ in await alternate(alone, 1.0)]
        assert statuses.count(200) >= 2 * R
    flow = {"store": postgres_url}
    loop = asyncio.get_running_loop()
    began = loop.time()
    async with gateways(tmp_path, [flow, flow]) as (shared, replica):
        answers = await alternate(shared, 1.5)
        refill = R * (loop.time() - began) / 60  # what the global bucket gained meanwhile
        passed = [status for status, _ in answers].count(200)
        # Every slice comes out of one bucket; each gateway may still hold one unused.
        assert R - 2 * 2 <= passed <= R + refill + 1, (passed, refill)
        assert replica.served == passed and {status for status, _ in answers} == {200, 429}
        refusal = next(message for status, message in answers if status == 429)
        assert "this gateway's share of the limit, leased in slices from the limits store" in (
            refusal
        )
        assert errors(shared[0]) == errors(shared[1]) == 0


async def test_an_outage_is_served_under_allow_refused_under_deny_and_recovered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, stoppable_postgres_server: PostgresServer
) -> None:
    server = stoppable_postgres_server
    url = await fresh_database(server)
    flows = [{"store": url, "store_unavailable": mode} for mode in ("allow", "deny")]
    with caplog.at_level(logging.INFO, "gateway.control.limits_store"):
        async with gateways(tmp_path, list(flows), rpm=120) as ((allow, deny), _):
            await _outage(server, allow, deny)
    assert "store_unavailable is allow" in caplog.text
    assert "store_unavailable is deny" in caplog.text
    assert caplog.text.count("reachable again") == 2


async def _outage(server: PostgresServer, allow: Gateway, deny: Gateway) -> None:
    """requests_per_minute 120: 2 a second, a slice of 6."""
    async with aiohttp.ClientSession() as client:
        assert (await complete(client, allow))[0] == (await complete(client, deny))[0] == 200
        await asyncio.to_thread(server.stop)
        for gw in (allow, deny):  # spend what each holds: the loops reach for the store
            while (await complete(client, gw))[0] == 200:
                pass
        await wait_until(lambda: errors(allow) >= 1 and errors(deny) >= 1)
        status, message = await complete(client, deny)
        assert status == 429
        assert "the limits store has been unavailable for" in message
        assert "(flow_control.store_unavailable: deny)" in message
        await asyncio.sleep(1.2)  # the clock brings `allow` 2 requests; `deny` gets none
        assert (await complete(client, allow))[0] == 200
        assert (await complete(client, deny))[0] == 429
        await asyncio.to_thread(server.start)
        await wait_until(lambda: _leased_again(deny), timeout_s=10)
        status, message = await complete(client, deny)
        assert status == 200, message


def _leased_again(gw: Gateway) -> bool:
    return gw.state.limiter.allowance("team-a", "requests").level >= 1
