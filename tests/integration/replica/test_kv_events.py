"""A real replica (simulated engine, continuous batching) publishing its prefix cache as vLLM
KV cache events, read with plain pyzmq and msgpack as a router would."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import msgpack  # type: ignore[import-untyped]
import zmq

from replica.kv import chain_hashes

from .conftest import Start

TIMEOUT = aiohttp.ClientTimeout(total=60)
END = b"\xff" * 8


def config() -> dict[str, Any]:
    return {
        "server": {"port": 0},
        "engine": {"kind": "simulated"},
        "models": [
            {
                "kind": "tiny-gpt",
                "params": {"context_len": 1024},
                "max_tokens_limit": 16,
                "batcher": {"kind": "continuous", "prefix_cache": {"block_size": 8}},
            }
        ],
        "kv_events": {
            "enable_kv_cache_events": True,
            "endpoint": "tcp://127.0.0.1:0",
            "replay_endpoint": "tcp://127.0.0.1:0",
            "topic": "kv@replica",
        },
    }


def replay(context: zmq.Context[Any], endpoint: str) -> list[tuple[int, bytes]]:
    with context.socket(zmq.DEALER) as dealer:
        dealer.setsockopt(zmq.RCVTIMEO, 5000)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(endpoint)
        dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        got: list[tuple[int, bytes]] = []
        while (frames := dealer.recv_multipart())[1] != END:
            got.append((int.from_bytes(frames[1], "big"), frames[2]))
        return got


def live(sub: zmq.Socket[bytes], until_seq: int) -> dict[int, list[bytes]]:
    """The messages the SUB got, up to seq `until_seq`; the earliest may predate the
    subscription and be missing."""
    got: dict[int, list[bytes]] = {}
    while until_seq not in got:
        frames = sub.recv_multipart()
        got[int.from_bytes(frames[1], "big")] = frames
    return got


async def complete(session: aiohttp.ClientSession, url: str, prompt: str) -> None:
    body = {"prompt": prompt, "max_tokens": 3, "temperature": 0}
    async with session.post(f"{url}/v1/completions", json=body) as response:
        assert response.status == 200, await response.text()


async def run(
    url: str, prompts: list[str]
) -> tuple[dict[str, Any], list[tuple[int, bytes]], dict[int, list[bytes]]]:
    """Subscribe, send the completions one after the other, read the replay; the listings of
    GET /cache/blocks before and after, the replayed batches, the live messages."""
    context: zmq.Context[Any] = zmq.Context()
    sub = context.socket(zmq.SUB)
    try:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            async with session.get(f"{url}/cache/blocks") as response:
                before = await response.json()
            sub.setsockopt(zmq.RCVTIMEO, 5000)
            sub.setsockopt(zmq.LINGER, 0)
            sub.connect(before["kv_events"])
            sub.subscribe(b"kv@")
            for prompt in prompts:
                await complete(session, url, prompt)
            async with session.get(f"{url}/cache/blocks") as response:
                after = await response.json()
        batches = await asyncio.to_thread(replay, context, after["kv_events_replay"])
        heard = await asyncio.to_thread(live, sub, batches[-1][0])
    finally:
        sub.close()
        context.term()
    assert before["blocks"] == [] and before["kv_events"].startswith("tcp://127.0.0.1:")
    return after, batches, heard


def stored_hashes(events: list[dict[str, Any]]) -> set[int]:
    """Checks each BlockStored as a router would read it; the hashes they stored."""
    cached: set[int] = set()
    seen: list[int] = []
    for event in events:
        assert event["type"] == "BlockStored", event  # nothing evicted: memory is ample
        assert event["block_size"] == 8 and event["medium"] == "GPU"
        assert (event["group_idx"], event["kv_cache_spec_kind"]) == (0, "full_attention")
        assert (event["lora_id"], event["lora_name"]) == (None, None)
        parent = event["parent_block_hash"]
        assert parent is None or parent in cached  # every chain link was stored before
        assert len(event["token_ids"]) == 8 * len(event["block_hashes"])
        cached |= set(event["block_hashes"])
        seen += event["block_hashes"]
    assert len(seen) == len(set(seen))  # the shared prefix was stored once, then reused
    return cached


async def test_two_completions_sharing_a_prefix_publish_the_cached_blocks(
    start_replica: Start,
) -> None:
    url = await start_replica(config())
    shared = "You are a careful assistant. Answer in one short sentence. " * 3
    first, second = shared + "What is a KV cache?", shared + "Why route by prefix?"
    listing, batches, heard = await run(url, [first, second])

    last = batches[-1][0]
    assert [seq for seq, _ in batches] == list(range(last + 1))  # seq from 0, no gaps
    for seq, frames in heard.items():  # live and replayed: the same bytes
        assert frames == [b"kv@replica", seq.to_bytes(8, "big"), batches[seq][1]]
    decoded = [msgpack.unpackb(payload) for _, payload in batches]
    assert all(isinstance(ts, float) and rank == 0 and events for ts, events, rank in decoded)
    assert decoded[0][1] == [{"type": "AllBlocksCleared"}]
    events = [event for _, batch, _ in decoded[1:] for event in batch]
    cached = stored_hashes(events)
    assert cached == {int(h, 16) for h in listing["blocks"]}

    one, two = ([256, *text.encode()] for text in (first, second))  # BOS, then bytes
    chain_one, chain_two = chain_hashes(one, 8), chain_hashes(two, 8)
    assert set(chain_one) | set(chain_two) <= cached
    assert (events[0]["block_hashes"], events[0]["parent_block_hash"]) == (chain_one, None)
    assert events[0]["token_ids"] == one[: 8 * len(chain_one)]  # one prefill step, one event
    common = next(i for i, (a, b) in enumerate(zip(chain_one, chain_two, strict=False)) if a != b)
    assert common >= 20  # the shared blocks, which the second prompt did not store again
    resumed = next(e for e in events if e["block_hashes"][0] == chain_two[common])
    assert resumed["parent_block_hash"] == chain_one[common - 1]
    assert resumed["token_ids"][:8] == two[8 * common : 8 * common + 8]
