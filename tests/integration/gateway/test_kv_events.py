"""precise_prefix on the engines' KV cache events, as a client sees it: a gateway in front of
two fake vLLM engines (an HTTP replica and a publisher that speaks vLLM's event wire byte for
byte, tests/support/vllm_events.py) sends a prompt where the events say its prefix is held,
and follows removals, clears, restarts, gaps (replayed) and a late start (replayed from 0);
what a hostile publisher sends is counted and dropped."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.support.servers import (
    FakeReplica,
    Gateway,
    fake_replicas,
    metric_sum,
    running_gateway,
    wait_until,
    write_config,
)
from tests.support.vllm_events import FakePublisher

SYSTEM = "You are a careful assistant. Answer in one sentence and cite the manual. " * 3
BLOCK = 16


def ids(text: str) -> list[int]:
    """The tokens our byte tokenizer (the gateway's default) makes of a prompt: BOS, bytes."""
    return [256, *text.encode()]


@asynccontextmanager
async def fleet(
    tmp_path: Path,
    n: int = 2,
    *,
    events: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    **publisher: Any,
) -> AsyncIterator[tuple[Gateway, list[FakeReplica], list[FakePublisher]]]:
    async with fake_replicas(n) as replicas, AsyncExitStack() as stack:
        pubs = [await stack.enter_async_context(FakePublisher(**publisher)) for _ in replicas]
        config = {
            "routing": {
                "strategy": "precise_prefix",
                "prefix": {"events": {"replay_timeout_s": 2.0, **(events or {})}},
            },
            "replicas": [
                {
                    "url": r.url,
                    "kv_events": {"endpoint": p.endpoint, "replay_endpoint": p.replay_endpoint},
                }
                for r, p in zip(replicas, pubs, strict=True)
            ],
            "reload": {"poll_interval_s": 0.1},
            **(extra or {}),
        }
        write_config(tmp_path / "gateway.yaml", config)
        gateway = await stack.enter_async_context(running_gateway(tmp_path / "gateway.yaml"))
        for pub in pubs:
            await pub.wait_subscribed()
        yield gateway, replicas, pubs


async def metric(gateway: Gateway, name: str, **labels: str) -> float:
    async with aiohttp.ClientSession() as client:
        return await metric_sum(client, gateway.url, name, **labels)


async def held(gateway: Gateway, replica: FakeReplica) -> float:
    return await metric(gateway, "gateway_kv_events_blocks", replica=replica.url)


async def wait_held(gateway: Gateway, replica: FakeReplica, blocks: int) -> None:
    for _ in range(250):
        if await held(gateway, replica) == blocks:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{replica.url} holds {await held(gateway, replica)}, not {blocks}")


async def routed(gateway: Gateway, prompt: str, n: int = 6) -> list[str]:
    """Which replica each of `n` completions of `prompt` went to."""
    names = []
    async with aiohttp.ClientSession() as client:
        for _ in range(n):
            body = {"model": "m", "prompt": prompt, "max_tokens": 1}
            async with client.post(f"{gateway.url}/v1/completions", json=body) as response:
                assert response.status == 200
                names.append(json.loads(await response.text())["replica"])
    return names


def blocks_of(text: str) -> int:
    return len(ids(text)) // BLOCK


@pytest.mark.parametrize(
    "publisher",
    [
        {"form": "map", "hashes": "int"},
        {"form": "map", "hashes": "bytes", "batch_form": "map"},
        {"form": "array", "hashes": "int", "batch_form": "array2"},
        {"engine": "sglang", "form": "array", "hashes": "int"},
        {"engine": "sglang", "form": "map", "hashes": "int"},
    ],
    ids=["vllm-map", "vllm-map-bytes", "vllm-array-old", "sglang-array", "sglang-map"],
)
async def test_a_prompt_goes_where_the_events_say_its_prefix_is_held(
    tmp_path: Path, publisher: dict[str, Any]
) -> None:
    events = {"engine": publisher.get("engine", "vllm")}
    async with fleet(tmp_path, events=events, **publisher) as (gateway, replicas, pubs):
        for holder in (1, 0):  # whichever holds it, not one the tie-break favours
            pubs[holder].stored(ids(SYSTEM))
            await pubs[holder].flush()
            await wait_held(gateway, replicas[holder], blocks_of(SYSTEM))
            assert set(await routed(gateway, SYSTEM + "Question?")) == {replicas[holder].name}
            pubs[holder].cleared()
            await pubs[holder].flush()
            await wait_held(gateway, replicas[holder], 0)


async def test_a_removed_prefix_is_forgotten_and_the_longer_match_wins(tmp_path: Path) -> None:
    async with fleet(tmp_path) as (gateway, replicas, pubs):
        a, b = pubs
        first = a.stored(ids(SYSTEM))
        await a.flush()
        b.stored(ids(SYSTEM)[: 3 * BLOCK])  # only its first three blocks
        await b.flush()
        await wait_held(gateway, replicas[0], blocks_of(SYSTEM))
        await wait_held(gateway, replicas[1], 3)
        assert set(await routed(gateway, SYSTEM + "Q")) == {replicas[0].name}
        a.removed(first[2:])  # the engine evicted all but its first two blocks
        await a.flush()
        await wait_held(gateway, replicas[0], 2)
        assert set(await routed(gateway, SYSTEM + "Q")) == {replicas[1].name}


async def test_a_block_off_the_gpu_counts_less_than_one_on_it(tmp_path: Path) -> None:
    async with fleet(tmp_path) as (gateway, replicas, pubs):
        a, b = pubs
        a.stored(ids(SYSTEM), medium="CPU")  # all of it, offloaded to host memory
        await a.flush()
        short = ids(SYSTEM)[: (blocks_of(SYSTEM) - 2) * BLOCK]
        b.stored(short)  # two blocks fewer, on the GPU
        await b.flush()
        await wait_held(gateway, replicas[0], blocks_of(SYSTEM))
        await wait_held(gateway, replicas[1], blocks_of(SYSTEM) - 2)
        assert set(await routed(gateway, SYSTEM + "Q")) == {replicas[1].name}


async def test_an_engine_restart_drops_what_it_held(tmp_path: Path) -> None:
    async with fleet(tmp_path) as (gateway, replicas, pubs):
        a = pubs[0]
        for _ in range(3):
            a.stored(ids(SYSTEM))  # the same prompt again: one block set, held once
            await a.flush()
        await wait_held(gateway, replicas[0], blocks_of(SYSTEM))
        a.restart()  # a new engine: seq from 0, an empty cache
        a.stored(ids("Another conversation entirely, at some length. " * 2))
        await a.flush()
        await wait_held(
            gateway, replicas[0], blocks_of("Another conversation entirely, at some length. " * 2)
        )
        assert await metric(gateway, "gateway_kv_events_total", event="restarts") == 1


async def test_a_gap_is_filled_from_the_replay_and_a_late_start_replays_from_zero(
    tmp_path: Path,
) -> None:
    async with fleet(tmp_path, n=1) as (gateway, replicas, pubs):
        pub = pubs[0]
        pub.stored(ids("zero " * 8))
        await pub.flush()
        await wait_held(gateway, replicas[0], blocks_of("zero " * 8))
        pub.skip(2)  # two batches the subscriber never receives live
        one = pub.stored(ids("one " * 8))
        await pub.flush()
        pub.stored(ids("two " * 8))
        await pub.flush()
        pub.removed(one)  # live again: the gateway sees seq 3 after 0, asks for 1 and 2
        await pub.flush()
        await wait_held(gateway, replicas[0], blocks_of("zero " * 8) + blocks_of("two " * 8))
        assert 1 in pub.replay_requests
        assert await metric(gateway, "gateway_kv_events_total", event="gaps") == 1
    # A gateway that starts after the engine published replays from 0 as it connects.
    async with FakePublisher() as pub, fake_replicas(1) as replicas:
        for text in ("early " * 8, "later " * 8):
            pub.stored(ids(text))
            await pub.flush()
        config = {
            "routing": {"strategy": "precise_prefix", "prefix": {"events": {}}},
            "replicas": [
                {
                    "url": replicas[0].url,
                    "kv_events": {
                        "endpoint": pub.endpoint,
                        "replay_endpoint": pub.replay_endpoint,
                    },
                }
            ],
        }
        write_config(tmp_path / "late.yaml", config)
        async with running_gateway(tmp_path / "late.yaml") as gateway:
            await pub.wait_subscribed()
            # Replayed on connecting, before the (idle) engine publishes anything new.
            before = sum(blocks_of(t * 8) for t in ("early ", "later "))
            await wait_held(gateway, replicas[0], before)
            pub.stored(ids("live " * 8))
            await pub.flush()
            every = sum(blocks_of(t * 8) for t in ("early ", "later ", "live "))
            await wait_held(gateway, replicas[0], every)
            assert pub.replay_requests == [0]


async def test_without_replay_a_gap_drops_what_was_held(tmp_path: Path) -> None:
    async with fleet(tmp_path, n=1, replay_port=None) as (gateway, replicas, pubs):
        pub = pubs[0]
        first = pub.stored(ids(SYSTEM))
        await pub.flush()
        await wait_held(gateway, replicas[0], blocks_of(SYSTEM))
        pub.skip(1)
        pub.removed(first)  # lost: the gateway would believe these blocks held forever
        await pub.flush()
        pub.stored(ids("after the gap " * 4))
        await pub.flush()
        await wait_held(gateway, replicas[0], blocks_of("after the gap " * 4))
        assert await metric(gateway, "gateway_kv_events_total", event="resyncs") == 1


async def test_a_hostile_publisher_is_counted_and_ignored(tmp_path: Path) -> None:
    async with fleet(tmp_path) as (gateway, replicas, pubs):
        bad = pubs[0]
        await bad.raw([b"only one frame"])
        await bad.raw([b"", b"short", b"x"])
        await bad.publish_payload(b"\xc1 not msgpack")
        await bad.publish_payload(b"\x92\xcb" + b"\x00" * 8 + b"\xdd\xff\xff\xff\xff")  # 4G array
        await bad.publish_batch([["BlockStored", "not a list"], {"type": 7}, 5, None])
        await bad.publish_batch([{"type": "BlockStored", "block_hashes": [True], "token_ids": []}])
        bad.stored(ids(SYSTEM), block_size=32)  # not the gateway's block size
        await bad.flush()
        bad.stored(ids(SYSTEM))
        await bad.flush()
        await wait_held(gateway, replicas[0], blocks_of(SYSTEM))  # the good batch still counts
        assert await metric(gateway, "gateway_kv_events_total", event="decode_errors") == 4
        assert await metric(gateway, "gateway_kv_events_total", event="rejected_events") == 5
        assert await metric(gateway, "gateway_kv_events_total", event="foreign_blocks") > 0
        assert set(await routed(gateway, SYSTEM + "Q", 3)) == {replicas[0].name}


async def test_a_policy_a_reload_makes_new_starts_with_what_the_events_said(
    tmp_path: Path,
) -> None:
    async with fleet(tmp_path) as (gateway, replicas, pubs):
        pubs[1].stored(ids(SYSTEM))
        await pubs[1].flush()
        await wait_held(gateway, replicas[1], blocks_of(SYSTEM))
        path = gateway.config_path
        for strategy in ("least_outstanding_requests", "precise_prefix"):
            config = yaml.safe_load(path.read_text())
            config["routing"]["strategy"] = strategy
            write_config(path, config)
            await wait_until(lambda s=strategy: gateway.state.runtime.policy.name == s)
        # No event since: the new policy was handed what the feed holds.
        assert set(await routed(gateway, SYSTEM + "Q")) == {replicas[1].name}


async def test_a_replica_back_in_rotation_is_known_to_hold_what_it_held(tmp_path: Path) -> None:
    check = {"path": "/ping", "interval_s": 0.05, "timeout_s": 1, "unhealthy_threshold": 1}
    async with fleet(tmp_path, extra={"health_check": check}) as (gateway, replicas, pubs):
        pubs[1].stored(ids(SYSTEM))
        await pubs[1].flush()
        await wait_held(gateway, replicas[1], blocks_of(SYSTEM))
        pool = gateway.state.pool
        replicas[1].healthy = False  # out of rotation for a while ...
        await wait_until(lambda: [r.url for r in pool.available()] == [replicas[0].url])
        assert set(await routed(gateway, SYSTEM + "Q", 2)) == {replicas[0].name}
        replicas[1].healthy = True  # ... and back: what it held is still known, no new event
        await wait_until(lambda: len(pool.available()) == 2)
        assert set(await routed(gateway, SYSTEM + "Q")) == {replicas[1].name}


async def test_an_engine_gone_with_batches_in_flight_is_known_to_hold_nothing(
    tmp_path: Path,
) -> None:
    async with fake_replicas(1) as replicas, AsyncExitStack() as stack:
        pub = await FakePublisher().start()
        stack.push_async_callback(pub.close)
        config = {
            "routing": {"strategy": "precise_prefix", "prefix": {"events": {}}},
            "replicas": [{"url": replicas[0].url, "kv_events": {"endpoint": pub.endpoint}}],
        }
        write_config(tmp_path / "g.yaml", config)
        gateway = await stack.enter_async_context(running_gateway(tmp_path / "g.yaml"))
        await pub.wait_subscribed()
        pub.stored(ids(SYSTEM))
        await pub.flush()
        await wait_held(gateway, replicas[0], blocks_of(SYSTEM))
        for i in range(10):  # sent, then the engine stops at once: they arrive with its exit
            pub.stored(ids(f"batch {i} " * 8))
            await pub.flush()
        await pub.close()
        await wait_held(gateway, replicas[0], 0)


async def test_only_the_main_attention_group_counts(tmp_path: Path) -> None:
    async with fleet(tmp_path, n=1) as (gateway, replicas, pubs):
        pub = pubs[0]
        pub.stored(ids(SYSTEM), kind="mla_attention", group_idx=0)  # DeepSeek-class: main
        pub.stored(ids("other " * 8), kind="sliding_window", group_idx=1)
        first = pub.stored(ids("third " * 8), kind="full_attention", group_idx=0)
        await pub.flush()
        main = blocks_of(SYSTEM) + blocks_of("third " * 8)
        await wait_held(gateway, replicas[0], main)
        # The same hashes evicted from the sliding-window group: still held in the main one.
        removal = {"type": "BlockRemoved", "block_hashes": first, "medium": "GPU", "group_idx": 1}
        await pub.publish_batch([removal])
        pub.stored(ids("marker " * 8))
        await pub.flush()
        await wait_held(gateway, replicas[0], main + blocks_of("marker " * 8))
        assert await metric(gateway, "gateway_kv_events_total", event="other_group_blocks") > 0


async def test_extra_keys_move_a_block_off_the_plain_chain_however_deep(tmp_path: Path) -> None:
    async with fleet(tmp_path) as (gateway, replicas, pubs):
        pub = pubs[0]
        deep: Any = "an image"
        for _ in range(900):  # as deep as msgpack lets a publisher nest it
            deep = [deep]
        tokens = ids(SYSTEM)[: 2 * BLOCK]
        stored = {
            "type": "BlockStored", "block_hashes": [11, 12], "parent_block_hash": None,
            "token_ids": tokens, "block_size": BLOCK, "lora_id": None, "medium": "GPU",
            "lora_name": None, "extra_keys": [deep, None],
        }  # fmt: skip
        await pub.publish_batch([stored])
        await wait_held(gateway, replicas[0], 2)
        # Its tokens are SYSTEM's, but under an image: a plain SYSTEM prompt does not match it.
        pubs[1].stored(ids(SYSTEM)[:BLOCK])
        await pubs[1].flush()
        await wait_held(gateway, replicas[1], 1)
        assert set(await routed(gateway, SYSTEM + "Q", 3)) == {replicas[1].name}
        assert await metric(gateway, "gateway_kv_events_total", event="apply_errors") == 0
