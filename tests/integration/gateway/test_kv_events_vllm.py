"""precise_prefix in front of engines that are not ours: two fake vLLM engines (their OpenAI
API, a real Hugging Face tokenizer and chat template, and KV cache events byte for byte as
vLLM publishes them, with its sha256 block hashes the gateway cannot reproduce). The gateway
tokenizes each request with the engine's own tokenizer.json and chat template
(`routing.prefix.tokenizer`), so a conversation goes where the events say its prefix is cached,
by the official openai client, and moves when that engine evicts it or restarts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from openai import AsyncOpenAI

from tests.support.servers import Gateway, metric_sum, running_gateway, write_config
from tests.support.tokenizer_files import chat_ids, completion_ids, write_tokenizer
from tests.support.vllm_engine import FakeVllm, fake_vllm_engines

SYSTEM = (
    "You are the support assistant of a shipping company. Answer questions about parcels, "
    "delivery times and returns. Be brief, be polite, and never invent a tracking number. "
) * 2


@asynccontextmanager
async def vllm_fleet(
    tmp_path: Path, **publisher: Any
) -> AsyncIterator[tuple[Gateway, list[FakeVllm], AsyncOpenAI]]:
    tokenizer = write_tokenizer(tmp_path / "model")
    async with fake_vllm_engines(2, tokenizer, **publisher) as engines, AsyncExitStack() as stack:
        config = {
            "routing": {
                "strategy": "precise_prefix",
                "prefix": {
                    "tokenizer": str(tokenizer),
                    "events": {"engine": publisher.get("engine", "vllm")},
                },
            },
            "replicas": [
                {
                    "url": e.url,
                    "kv_events": {
                        "endpoint": e.publisher.endpoint,
                        "replay_endpoint": e.publisher.replay_endpoint,
                    },
                }
                for e in engines
            ],
            "load_feedback": {"poll_interval_s": 0},
        }
        write_config(tmp_path / "gateway.yaml", config)
        gateway = await stack.enter_async_context(running_gateway(tmp_path / "gateway.yaml"))
        for engine in engines:
            await engine.publisher.wait_subscribed()
        client = AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
        stack.push_async_callback(client.close)
        yield gateway, engines, client


async def settled(engine: FakeVllm, gateway: Gateway) -> None:
    """Until the gateway says (its /metrics) it knows of as many blocks as the engine holds."""
    async with aiohttp.ClientSession() as client:
        for _ in range(250):
            held = await metric_sum(
                client, gateway.url, "gateway_kv_events_blocks", replica=engine.url
            )
            if held == len(engine.cache):
                return
            await asyncio.sleep(0.02)
    raise AssertionError(
        f"the gateway knows {held} blocks of {engine.url}, not {len(engine.cache)}"
    )


@pytest.mark.parametrize(("hashes", "length"), [("bytes", 1), ("int", 1), ("bytes", 12)])
async def test_a_conversation_goes_to_the_engine_that_cached_its_prefix(
    tmp_path: Path, hashes: str, length: int
) -> None:
    # 12 x SYSTEM is a body past OFFLOAD_MIN_BYTES: tokenized in a thread, off the event loop.
    def chat(question: str) -> list[Any]:
        return [
            {"role": "system", "content": SYSTEM * length},
            {"role": "user", "content": question},
        ]

    async with vllm_fleet(tmp_path, hashes=hashes) as (gateway, engines, client):
        for holder in (engines[1], engines[0]):  # warmed directly, not through the gateway
            await holder.prompt(chat_ids(holder.tokenizer, chat("Where is my parcel?")))
            await settled(holder, gateway)
            for question in ("Can I return shoes?", "How long does delivery take?"):
                reply = await client.chat.completions.create(
                    model="fake-model", messages=chat(question), max_tokens=1
                )
                assert reply.choices[0].message.content == holder.name
                assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
                assert reply.usage.prompt_tokens_details.cached_tokens >= 64
            await holder.evict()  # gone from that engine: the next one decides alone
            await settled(holder, gateway)


async def test_completions_are_tokenized_with_the_bos_and_follow_an_sglang_engine(
    tmp_path: Path,
) -> None:
    async with vllm_fleet(tmp_path, engine="sglang", form="array") as (gateway, engines, client):
        holder = engines[1]
        await holder.prompt(completion_ids(holder.tokenizer, SYSTEM + "Question one."))
        await settled(holder, gateway)
        for question in ("Question two.", "Question three."):
            reply = await client.completions.create(
                model="fake-model", prompt=SYSTEM + question, max_tokens=1
            )
            assert reply.choices[0].text == holder.name
