"""Prefix-aware routing end to end: real simulated replicas with prefix caches behind a real
gateway, multi-turn chats through the official openai client, and the fleet's cache hit rate
read from the replicas' own metrics."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from openai import AsyncOpenAI
from prometheus_client.parser import text_string_to_metric_families

from loadtests.harness.runner import free_port_block
from replica.config import parse_config
from replica.engines.profile import load_profile
from replica.keys import STATE
from replica.server import create_app
from tests.support.servers import running_gateway, serve, write_config

SYSTEMS = [f"System prompt {k}: " + "follow the house style closely. " * 16 for k in range(12)]


def replica_config(workdir: Path, events_port: int | None = None) -> dict[str, Any]:
    fast = load_profile().model_dump()  # the 7B profile's shape, 20x faster: a quick test
    fast["generation"] |= {
        "prefill_base_s": 0.0005, "prefill_s_per_token": 0.00002,
        "decode_base_s": 0.0015, "decode_per_seq_s": 0.00005,
    }  # fmt: skip
    profile = workdir / "fast.yaml"
    profile.write_text(yaml.safe_dump(fast))
    kv_events = {}
    if events_port is not None:  # as vLLM's --kv-events-config, bound to loopback
        kv_events = {
            "enable_kv_cache_events": True,
            "endpoint": f"tcp://127.0.0.1:{events_port}",
            "replay_endpoint": f"tcp://127.0.0.1:{events_port + 1}",
            "bind": True,
        }
    return {
        "kv_events": kv_events,
        "server": {"port": 0},
        "engine": {"kind": "simulated", "profile_path": str(profile)},
        "models": [
            {
                "kind": "tiny-gpt",
                "params": {"context_len": 4096},
                "max_tokens_limit": 64,
                "batcher": {"kind": "continuous", "kv_capacity_tokens": 65536},
            }
        ],
    }


@asynccontextmanager
async def replica(
    workdir: Path, port: int = 0, events_port: int | None = None
) -> AsyncIterator[str]:
    app = create_app(parse_config(replica_config(workdir, events_port)))
    async with serve(app, port=port) as url:
        await app[STATE].settled.wait()
        yield url


@asynccontextmanager
async def simulated_replicas(n: int, workdir: Path) -> AsyncIterator[list[str]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(replica(workdir)) for _ in range(n)]


async def fleet_hit_ratio(urls: list[str]) -> tuple[float, list[float]]:
    """Hit tokens over queried tokens, summed over the fleet; and each replica's queried share."""
    totals = []
    async with aiohttp.ClientSession() as session:
        for url in urls:
            async with session.get(f"{url}/metrics") as response:
                text = await response.text()
            values = {
                s.name: s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
            }
            totals.append(
                (
                    values["replica_prefix_cache_hit_tokens_total"],
                    values["replica_prefix_cache_queried_tokens_total"],
                )
            )
    queried = sum(q for _, q in totals)
    return sum(h for h, _ in totals) / queried, [q / queried for _, q in totals]


async def conversations(base_url: str, seed: int) -> None:
    """30 conversations of 4 turns over 12 system prompts, 6 at a time; each turn re-sends the
    whole history."""
    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    rng = random.Random(seed)
    plans = [(rng.choice(SYSTEMS), i) for i in range(30)]
    gate = asyncio.Semaphore(6)

    async def one(system: str, i: int) -> None:
        async with gate:
            messages: list[Any] = [{"role": "system", "content": system}]
            for turn in range(4):
                question = f"Conversation {i}, turn {turn}: " + "tell me more about it. " * 4
                messages.append({"role": "user", "content": question})
                reply = await client.chat.completions.create(
                    model="tiny-gpt", messages=messages, max_tokens=8, temperature=0
                )
                messages.append({"role": "assistant", "content": reply.choices[0].message.content})

    await asyncio.gather(*(one(system, i) for system, i in plans))
    await client.close()


async def run(strategy: str, tmp_path: Path) -> tuple[float, list[float]]:
    async with simulated_replicas(3, tmp_path) as urls:
        path = tmp_path / f"{strategy}.yaml"
        config = {
            "routing": {"strategy": strategy, "seed": 1},
            "replicas": [{"url": u} for u in urls],
        }
        write_config(path, config)
        async with running_gateway(path) as gateway:
            await conversations(gateway.url, seed=7)
        # running_gateway has asserted that every outstanding count is back at zero
        return await fleet_hit_ratio(urls)


async def test_prefix_aware_reaches_a_higher_fleet_cache_hit_rate_than_least_outstanding(
    tmp_path: Path,
) -> None:
    lor, _ = await run("least_outstanding_requests", tmp_path)
    prefix, prefix_spread = await run("prefix_aware", tmp_path)
    # Prompt tokens prefilled (not served from a cache): one replica alone would miss about 20%
    # (each system prompt once, and each new question); least outstanding misses about 30%.
    assert 1 - prefix < 0.9 * (1 - lor), (prefix, lor)
    assert min(prefix_spread) > 0.1, prefix_spread  # no replica was left out


PROMPT = SYSTEMS[0] + "What is the house style?"


async def complete(client: aiohttp.ClientSession, url: str) -> tuple[str | None, int]:
    """One completion of PROMPT: the replica that served it, and its cached prompt tokens."""
    body = {"model": "tiny-gpt", "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    async with client.post(f"{url}/v1/completions", json=body) as response:
        assert response.status == 200, await response.text()
        usage = (await response.json())["usage"]
        return response.headers.get("X-Infergate-Replica"), usage["prompt_tokens_details"][
            "cached_tokens"
        ]


def precise_config(
    urls: list[str], path: Path, events_ports: list[int] | None = None, **extra: Any
) -> Path:
    """precise_prefix polling GET /cache/blocks, or following KV cache events at these ports."""
    prefix: dict[str, Any] = {"poll_interval_s": 0.05}
    replicas: list[dict[str, Any]] = [{"url": u} for u in urls]
    if events_ports is not None:
        prefix["events"] = {}
        for spec, port in zip(replicas, events_ports, strict=True):
            spec["kv_events"] = {
                "endpoint": f"tcp://127.0.0.1:{port}",
                "replay_endpoint": f"tcp://127.0.0.1:{port + 1}",
            }
    config = {
        "routing": {"strategy": "precise_prefix", "prefix": prefix},
        "replicas": replicas,
        **extra,
    }
    write_config(path, config)
    return path


async def polled() -> None:
    await asyncio.sleep(0.25)  # five poll intervals: every replica's report is in


@pytest.mark.parametrize("source", ["polling", "events"])
async def test_precise_prefix_follows_a_replica_that_restarts_with_an_empty_cache(
    tmp_path: Path, source: str
) -> None:
    ports = [None, None]
    if source == "events":  # each replica's events on two ports of its own
        first = free_port_block(4, start=36000)
        ports = [first, first + 2]
    async with (
        replica(tmp_path, events_port=ports[0]) as x,
        AsyncExitStack() as y_lifetime,
        AsyncExitStack() as y_again,
        aiohttp.ClientSession() as client,
    ):
        y = await y_lifetime.enter_async_context(replica(tmp_path, events_port=ports[1]))
        events = [p for p in ports if p is not None] or None
        async with running_gateway(precise_config([x, y], tmp_path / "g.yaml", events)) as gateway:
            assert (await complete(client, y))[1] == 0  # y is warmed directly, not through us
            await polled()
            for _ in range(3):
                served, cached = await complete(client, gateway.url)
                assert (served, cached > 500) == (y, True)
            await y_lifetime.aclose()  # y stops, and comes back on its port with an empty cache
            port = int(y.rsplit(":", 1)[1])
            y_back = replica(tmp_path, port=port, events_port=ports[1])
            assert await y_again.enter_async_context(y_back) == y
            await complete(client, x)  # now x holds the prefix, y does not
            await polled()
            for _ in range(3):
                served, cached = await complete(client, gateway.url)
                assert (served, cached > 500) == (x, True)


async def test_two_gateways_with_precise_prefix_make_the_same_choices(tmp_path: Path) -> None:
    async with simulated_replicas(3, tmp_path) as urls, aiohttp.ClientSession() as client:
        await complete(client, urls[1])  # one replica holds PROMPT's prefix
        # The same view: load reports (the other gateway's requests, capacities) that expire
        # before each next pair is sent, so only the replicas' cache reports differ in time.
        quiet = {"load_feedback": {"poll_interval_s": 0, "max_age_s": 0.1}}
        one = precise_config(urls, tmp_path / "one.yaml", **quiet)
        two = precise_config(urls, tmp_path / "two.yaml", **quiet)
        async with running_gateway(one) as first, running_gateway(two) as second:
            await polled()
            body = {"model": "tiny-gpt", "max_tokens": 1, "temperature": 0}
            for i in range(12):
                prompt = PROMPT if i % 3 == 0 else f"Prompt {i}: " + "words and more words " * 8
                payload = {**body, "prompt": prompt}

                async def send(gateway: Any, payload: dict[str, Any] = payload) -> str:
                    async with client.post(f"{gateway.url}/v1/completions", json=payload) as r:
                        assert r.status == 200
                        return r.headers["X-Infergate-Replica"]

                # At the same moment, from the same reports: neither has seen the other's send.
                chosen = await asyncio.gather(send(first), send(second))
                await polled()
                assert chosen[0] == chosen[1], (i, chosen)
                if prompt == PROMPT:
                    assert chosen[0] == urls[1]


async def test_the_status_page_shows_each_replicas_cache_hits_and_kv_usage(
    tmp_path: Path,
) -> None:
    async with simulated_replicas(2, tmp_path) as urls, aiohttp.ClientSession() as client:
        path = tmp_path / "g.yaml"
        config = {
            "routing": {"strategy": "prefix_aware"},
            "replicas": [{"url": u} for u in urls],
            "load_feedback": {"poll_interval_s": 0.05},
        }
        write_config(path, config)
        async with running_gateway(path) as gateway:
            for _ in range(3):
                served, _ = await complete(client, gateway.url)
            await asyncio.sleep(0.3)
            async with client.get(f"{gateway.url}/ui/status.json") as response:
                status = await response.json()
    rows = {r["url"]: r for r in status["replicas"]}
    assert rows[served]["cache_hit_ratio"] > 0.5  # two of three sends were served from cache
    other = next(u for u in urls if u != served)
    assert rows[other]["cache_hit_ratio"] is None  # it was never sent a prompt
    assert all(0 <= r["kv_usage"] <= 1 for r in rows.values())
