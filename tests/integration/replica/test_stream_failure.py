"""A stream that fails after its first chunk ends with an SSE error event and never `[DONE]`."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from openai import APIError, AsyncOpenAI

from .conftest import Start, small_config

TIMEOUT = aiohttp.ClientTimeout(total=30)  # a stream that never ends fails, not hangs


def events_of(body: bytes) -> list[tuple[str, str]]:
    """(event field, data) of each SSE event in a whole stream."""
    out = []
    for block in body.decode().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "data" in fields:
            out.append((fields.get("event", ""), fields["data"]))
    return out


async def stream(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> bytes:
    async with session.post(f"{url}/v1/completions", json={**body, "stream": True}) as response:
        assert response.status == 200
        return await response.read()


async def test_engine_failure_mid_stream_ends_with_an_error_event_and_no_done(
    start_replica: Start,
) -> None:
    raw = small_config() | {"engine": {"fail_every_n_steps": 5}}  # steps 5, 10, 15 fail
    url = await start_replica(raw)
    body = {"prompt": "go", "max_tokens": 20, "temperature": 0}
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        events = events_of(await stream(session, url, body))
        assert [kind for kind, _ in events] == [""] * 4 + ["error"]  # steps 1-4 gave 4 tokens
        assert all(json.loads(data)["choices"][0]["text"] for _, data in events[:4])
        error = json.loads(events[-1][1])["error"]
        assert error["type"] == "internal_error"
        assert "mid-stream" in error["message"]
        async with AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=30) as client:
            chunks = await client.completions.create(model="tiny-gpt", stream=True, **body)
            with pytest.raises(APIError, match="mid-stream"):
                async for _ in chunks:  # steps 6-9 stream, step 10 fails
                    pass
        events = events_of(await stream(session, url, body | {"max_tokens": 3}))
        assert [data for _, data in events][-1] == "[DONE]"  # steps 11-13: still serving


async def test_prompt_timing_out_mid_stream_ends_the_stream_without_done(
    start_replica: Start,
) -> None:
    # One sequence at a time: the second prompt waits in the queue and times out while the
    # first one streams (the simulated engine takes ~28 ms per token, 10 ms for the first).
    batcher = {"kind": "continuous", "max_num_seqs": 1, "queue_timeout_ms": 300}
    url = await start_replica(small_config(batcher) | {"engine": {"kind": "simulated"}})
    body = {"prompt": ["first", "second"], "max_tokens": 100, "temperature": 0}
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        events = events_of(await stream(session, url, body))
    assert "[DONE]" not in [data for _, data in events]
    kinds = [kind for kind, _ in events]
    assert kinds == [""] * (len(events) - 1) + ["error"]
    assert len(events) > 1  # it did fail mid-way, after the first prompt's tokens
    assert json.loads(events[-1][1])["error"]["type"] == "queue_timeout"
