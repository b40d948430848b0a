"""Torch engine with paged KV: the prefix cache and chunked prefill change no token (float64),
and a cached prefix is really not computed again."""

from __future__ import annotations

import asyncio

import pytest
import torch

from replica.batching import ContinuousBatcher
from replica.batching.clock import FakeClock
from replica.batching.testing import InlineExecutor
from replica.config import TinyGptParams
from replica.engines.base import KvLayout
from replica.engines.torch_engine import TorchGenerationEngine
from replica.generation import Completion, GenRequest, SamplingParams
from replica.models.tokenizer import encode

CONTEXT = 512
SYSTEM = "You are a terse assistant. Answer in one line. " * 3  # 141 bytes: 8 full blocks
PROMPTS = {
    "none": ["alpha", "beta gamma", "delta " * 20],  # share only BOS: no full block in common
    "one": ["0123456789abcdef" + s for s in ("x", "yy", "zzz" * 30)],  # one shared block
    "many": [SYSTEM + s for s in ("What is 2+2?", "Name a colour.", "Why? " * 40)],
}


def engine() -> TorchGenerationEngine:
    params = TinyGptParams(context_len=CONTEXT, dtype="float64")
    return TorchGenerationEngine(params, torch.device("cpu"), KvLayout.holding(8 * CONTEXT))


def batcher(gen: TorchGenerationEngine, *, prefix_cache: bool, budget: int) -> ContinuousBatcher:
    return ContinuousBatcher(
        gen, executor=InlineExecutor(), clock=FakeClock(), max_num_seqs=8,
        max_batch_tokens=budget, prefix_cache=prefix_cache,
    )  # fmt: skip


def requests(prompts: list[str], sampled: bool = False, max_tokens: int = 12) -> list[GenRequest]:
    sampling = SamplingParams(0.8, 0.95, 3) if sampled else SamplingParams()
    return [GenRequest(encode(p), max_tokens, CONTEXT, sampling) for p in prompts]


async def run(b: ContinuousBatcher, prompts: list[str], *, batched: bool) -> list[Completion]:
    if batched:
        return list(await asyncio.gather(*(b.submit(r) for r in requests(prompts))))
    return [await b.submit(r) for r in requests(prompts)]


@pytest.mark.parametrize("shared", sorted(PROMPTS))
@pytest.mark.parametrize("batched", [False, True], ids=["alone", "batched"])
async def test_cache_on_gives_the_same_tokens_as_cache_off(shared: str, batched: bool) -> None:
    prompts = PROMPTS[shared]
    off = batcher(engine(), prefix_cache=False, budget=2048)
    want = [c.token_ids for c in await run(off, prompts, batched=batched)]
    on = batcher(engine(), prefix_cache=True, budget=2048)
    await run(on, prompts, batched=batched)  # warm the cache with the same prompts
    again = await run(on, prompts, batched=batched)
    assert [c.token_ids for c in again] == want
    # a repeated prompt finds every full block short of its last token
    assert [c.cached_tokens for c in again] == [(c.prompt_tokens - 1) // 16 * 16 for c in again]
    await asyncio.gather(off.close(), on.close())


async def test_a_cached_prefix_is_not_computed_again() -> None:
    gen = engine()
    b = batcher(gen, prefix_cache=True, budget=2048)
    first, second = PROMPTS["many"][:2]
    await b.submit(requests([first])[0])
    before = gen.computed_positions
    done = await b.submit(requests([second])[0])
    computed = gen.computed_positions - before
    prompt = len(encode(second))
    assert done.cached_tokens == 128  # BOS + SYSTEM's 141 bytes hold 8 full blocks
    assert computed == prompt - 128 + len(done.token_ids) - 1  # the tail, then the decodes
    await b.close()


@pytest.mark.parametrize("budget", [16, 40, 97])
async def test_chunked_prefill_gives_the_same_tokens_as_whole_prefill(budget: int) -> None:
    prompts = [SYSTEM + "Tell me more. " * 10, "short", "x" * 300]
    whole = batcher(engine(), prefix_cache=False, budget=2048)
    want = [c.token_ids for c in await run(whole, prompts, batched=True)]
    chunked = batcher(engine(), prefix_cache=False, budget=budget)
    assert [c.token_ids for c in await run(chunked, prompts, batched=True)] == want
    await asyncio.gather(whole.close(), chunked.close())


async def test_seeded_sampling_is_the_same_with_the_cache_and_chunking() -> None:
    prompts = PROMPTS["many"]
    plain = batcher(engine(), prefix_cache=False, budget=2048)
    want = [(await plain.submit(r)).token_ids for r in requests(prompts, sampled=True)]
    cached = batcher(engine(), prefix_cache=True, budget=24)
    for r in requests(prompts, sampled=True):
        await cached.submit(r)
    got = [(await cached.submit(r)).token_ids for r in requests(prompts, sampled=True)]
    assert got == want
    await asyncio.gather(plain.close(), cached.close())


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
async def test_preemption_changes_no_token(sampled: bool) -> None:
    """KV memory for about two of six sequences: the newest are preempted and recomputed
    (prompt and the tokens they had streamed); every token is as with room for all."""
    prompts = [SYSTEM[: 20 + 9 * i] for i in range(6)]
    params = TinyGptParams(context_len=CONTEXT, dtype="float64")
    tight_engine = TorchGenerationEngine(params, torch.device("cpu"), KvLayout(num_blocks=12))
    got = {}
    for name, gen in (("roomy", engine()), ("tight", tight_engine)):
        b = batcher(gen, prefix_cache=False, budget=64)
        done = await asyncio.gather(*map(b.submit, requests(prompts, sampled, max_tokens=80)))
        got[name] = [c.token_ids for c in done]
        preemptions = b.blocks.stats().preemptions
        await b.close()
    assert preemptions > 0
    assert got["tight"] == got["roomy"]
