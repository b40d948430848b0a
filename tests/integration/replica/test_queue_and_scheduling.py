"""Queue limits and scheduling through HTTP: 429 + Retry-After, 503 on queue timeout, and a
short request overtaking a long one under continuous batching."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from .conftest import Start, small_config


async def load_of(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(f"{url}/load") as response:
        payload: dict[str, Any] = await response.json()
        return payload


async def test_queue_full_is_429_with_retry_after_and_timeout_is_503(start_replica: Start) -> None:
    # static batch_size 4 never fills with one request: it waits until its queue timeout.
    batcher = {"kind": "static", "batch_size": 4, "max_queue": 1, "queue_timeout_ms": 500}
    url = await start_replica(small_config(gen_batcher=batcher))
    body = {"prompt": "x", "max_tokens": 2}
    async with aiohttp.ClientSession() as session:
        first = asyncio.create_task(session.post(f"{url}/v1/completions", json=body))
        while (await load_of(session, url))["queued"] < 1:
            await asyncio.sleep(0.01)
        async with session.post(f"{url}/v1/completions", json=body) as response:
            assert response.status == 429
            assert int(response.headers["Retry-After"]) >= 1
            assert (await response.json())["error"]["type"] == "queue_full"
        async with await first as response:
            assert response.status == 503
            error = (await response.json())["error"]
            assert error["type"] == "queue_timeout"
        async with session.get(f"{url}/metrics") as response:
            text = await response.text()
        assert 'replica_rejections_total{model="tiny-gpt",reason="queue_full"} 1.0' in text
        assert 'replica_rejections_total{model="tiny-gpt",reason="queue_timeout"} 1.0' in text


async def stream_texts(
    session: aiohttp.ClientSession, url: str, max_tokens: int, started: asyncio.Event
) -> str:
    body = {"prompt": "go", "max_tokens": max_tokens, "temperature": 0, "stream": True}
    parts = []
    async with session.post(f"{url}/v1/completions", json=body) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        async for line in response.content:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            parts.append(json.loads(line[6:])["choices"][0]["text"])
            started.set()
    return "".join(parts)


async def test_short_request_arriving_during_a_long_one_finishes_first(
    start_replica: Start,
) -> None:
    url = await start_replica()
    async with aiohttp.ClientSession() as session:
        long_started = asyncio.Event()
        long = asyncio.create_task(stream_texts(session, url, 128, long_started))
        await long_started.wait()
        short = await stream_texts(session, url, 4, asyncio.Event())
        assert len(short) == 4
        assert not long.done()
        assert len(await long) == 128


async def test_the_other_model_is_served_while_a_long_generation_runs(
    start_replica: Start,
) -> None:
    """Both models share the replica's one forward thread: the continuous batcher gives it back
    between slices, so a classifier request does not wait for a long generation to end."""
    url = await start_replica()
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 16], "data": [0.5] * 16}]}
    async with aiohttp.ClientSession() as session:
        long_started = asyncio.Event()
        long = asyncio.create_task(stream_texts(session, url, 128, long_started))
        await long_started.wait()
        async with session.post(f"{url}/v2/models/classifier/infer", json=body) as response:
            assert response.status == 200
            assert len((await response.json())["outputs"][0]["data"]) == 4
        assert not long.done()
        assert len(await long) == 128
        assert (await load_of(session, url))["running"] == 0
