"""Batching changes no result, under every batcher, through the real HTTP API."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import numpy as np
import pytest

from .conftest import Start, small_config

PROMPTS = [("Batching must not change results. " * 3)[: 2 + 5 * i] for i in range(16)]

GEN_BATCHERS = [
    {"kind": "none"},
    {"kind": "static", "batch_size": 16, "max_wait_ms": 20},
    {"kind": "dynamic", "max_batch_size": 16, "max_wait_ms": 20},
    {"kind": "continuous", "max_num_seqs": 16},
]
CLS_BATCHERS = GEN_BATCHERS[:3]


async def complete(session: aiohttp.ClientSession, url: str, prompt: str) -> str:
    body = {"prompt": prompt, "max_tokens": 10, "temperature": 0}
    async with session.post(f"{url}/v1/completions", json=body) as response:
        assert response.status == 200, await response.text()
        payload: dict[str, Any] = await response.json()
        return str(payload["choices"][0]["text"])


@pytest.mark.parametrize("batcher", GEN_BATCHERS, ids=lambda b: b["kind"])
async def test_greedy_text_is_the_same_alone_and_in_a_batch_of_16(
    start_replica: Start, batcher: dict[str, Any]
) -> None:
    # float64: in float32 a different batch shape may round a near-tie argmax the other way.
    config = small_config(gen_batcher=batcher)
    config["models"][0]["params"]["dtype"] = "float64"
    url = await start_replica(config)
    async with aiohttp.ClientSession() as session:
        alone = [await complete(session, url, p) for p in PROMPTS]
        together = await asyncio.gather(*(complete(session, url, p) for p in PROMPTS))
    assert list(together) == alone


async def classify(session: aiohttp.ClientSession, url: str, row: np.ndarray) -> np.ndarray:
    body = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 16], "data": row.tolist()}]
    }
    async with session.post(f"{url}/v2/models/classifier/infer", json=body) as response:
        assert response.status == 200, await response.text()
        payload = await response.json()
        return np.array(payload["outputs"][0]["data"], dtype=np.float32)


@pytest.mark.parametrize("batcher", CLS_BATCHERS, ids=lambda b: b["kind"])
async def test_classifier_outputs_match_alone_and_batched(
    start_replica: Start, batcher: dict[str, Any]
) -> None:
    url = await start_replica(small_config(cls_batcher=batcher))
    rows = np.random.default_rng(1).standard_normal((16, 16)).astype(np.float32)
    async with aiohttp.ClientSession() as session:
        alone = [await classify(session, url, row) for row in rows]
        together = await asyncio.gather(*(classify(session, url, row) for row in rows))
    np.testing.assert_allclose(np.stack(together), np.stack(alone), atol=1e-4)
