"""A real replica (simulated engine) with the prefix cache and bounded KV memory, as clients,
routers and Prometheus see it."""

from __future__ import annotations

import asyncio
import hashlib
import struct
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

from replica.engines.profile import load_profile

from .conftest import Start

TIMEOUT = aiohttp.ClientTimeout(total=60)


def simulated(batcher: dict[str, Any], context_len: int = 4096, **engine: Any) -> dict[str, Any]:
    return {
        "server": {"port": 0},
        "engine": {"kind": "simulated", **engine},
        "models": [
            {
                "kind": "tiny-gpt",
                "params": {"context_len": context_len},
                "max_tokens_limit": 128,
                "batcher": {"kind": "continuous", **batcher},
            }
        ],
    }


async def metric(session: aiohttp.ClientSession, url: str, name: str) -> float:
    async with session.get(f"{url}/metrics") as response:
        text = await response.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("model") == "tiny-gpt":
                return float(sample.value)
    raise AssertionError(f"{name} not exported")


async def first_token_s(session: aiohttp.ClientSession, url: str, prompt: str) -> float:
    body = {"prompt": prompt, "max_tokens": 4, "temperature": 0, "stream": True}
    started = time.perf_counter()
    async with session.post(f"{url}/v1/completions", json=body) as response:
        assert response.status == 200
        await response.content.readline()  # the first SSE line comes with the first token
        elapsed = time.perf_counter() - started
        await response.read()
    return elapsed


async def test_a_repeated_2000_token_prompt_hits_the_cache(start_replica: Start) -> None:
    url = await start_replica(simulated({"prefix_cache": {"enabled": True}}))
    prompt = "".join(chr(97 + (i * 7) % 26) for i in range(1999))  # BOS + 1999 bytes
    hits = "replica_prefix_cache_hit_tokens_total"
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        before = await metric(session, url, hits)
        cold = await first_token_s(session, url, prompt)
        warm = await first_token_s(session, url, prompt)
        assert await metric(session, url, hits) - before == 1984  # 124 full blocks of 2000
        body = {"prompt": prompt + "?", "max_tokens": 2, "temperature": 0}
        async with session.post(f"{url}/v1/completions", json=body) as response:
            usage = (await response.json())["usage"]
    assert usage["prompt_tokens"] == 2001
    assert usage["prompt_tokens_details"] == {"cached_tokens": 2000}  # 125 blocks now
    # simulated prefill of 2000 tokens is 0.55 s, of 16 is 0.014 s: 3x is a wide margin
    assert warm * 3 <= cold, (cold, warm)


async def test_cache_blocks_lists_the_documented_hash_chain(start_replica: Start) -> None:
    url = await start_replica(simulated({"prefix_cache": {"enabled": True, "block_size": 8}}))
    prompt = "The same system prompt, every time. " * 2
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        body = {"prompt": prompt, "max_tokens": 3, "temperature": 0}
        async with session.post(f"{url}/v1/completions", json=body) as response:
            assert response.status == 200
            assert "kv_usage=" in response.headers["X-Replica-Load"]
        async with session.get(f"{url}/cache/blocks", params={"model": "tiny-gpt"}) as response:
            listing = await response.json()
        async with session.get(f"{url}/load") as response:
            load = await response.json()
        async with session.get(f"{url}/cache/blocks", params={"model": "nope"}) as response:
            assert response.status == 404
    tokens = [256, *prompt.encode()]
    chain, parent = [], 0
    for start in range(0, len(tokens) - 7, 8):  # the scheme as documented, from scratch
        data = struct.pack("<Q", parent) + struct.pack("<8I", *tokens[start : start + 8])
        parent = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
        chain.append(f"{parent:016x}")
    assert listing["block_size"] == 8 and listing["enabled"] is True
    assert set(chain) <= set(listing["blocks"])
    assert len(listing["blocks"]) <= listing["num_blocks"]
    assert 0 <= load["kv_usage"] <= 1 and "kv_usage" in load["models"]["tiny-gpt"]


async def test_kv_memory_is_enforced_by_preemption_not_errors(
    start_replica: Start, tmp_path: Path
) -> None:
    fast = load_profile().model_dump()
    fast["generation"] |= {"prefill_base_s": 0.0005, "prefill_s_per_token": 0.000002,
                           "decode_base_s": 0.001, "decode_per_seq_s": 0.00002}  # fmt: skip
    profile = tmp_path / "fast.yaml"
    profile.write_text(yaml.safe_dump(fast))
    batcher = {"max_num_seqs": 32, "kv_capacity_tokens": 1024, "prefix_cache": {"enabled": False}}
    url = await start_replica(simulated(batcher, context_len=512, profile_path=str(profile)))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:

        async def one(i: int) -> dict[str, Any]:
            body = {"prompt": f"{i:03d} " + "x" * 120, "max_tokens": 100, "temperature": 0}
            async with session.post(f"{url}/v1/completions", json=body) as response:
                assert response.status == 200, await response.text()
                result: dict[str, Any] = await response.json()
                return result

        results = await asyncio.gather(*(one(i) for i in range(64)))  # 226 tokens each
        preempted = await metric(session, url, "replica_preemptions_total")
        async with session.get(f"{url}/load") as response:
            load = await response.json()
    assert all(r["usage"]["completion_tokens"] == 100 for r in results)
    assert all(r["choices"][0]["finish_reason"] == "length" for r in results)
    assert preempted > 0
    assert (load["running"], load["queued"], load["kv_usage"]) == (0, 0, 0)
