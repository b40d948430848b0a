"""`/v1/chat/completions` on a real replica (torch engine, tiny model), directly and through a
real gateway: the official openai client (sync and async, streamed and not), the exact SSE
chunks, usage, 400s naming the field, and SageMaker's `/invocations` with `messages`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from openai import APIError, AsyncOpenAI, BadRequestError, OpenAI
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletionMessageParam

from replica.models.chat_template import apply_chat_template
from replica.models.tokenizer import encode
from tests.support.servers import running_gateway, write_config

from .conftest import Start, small_config
from .test_stream_failure import TIMEOUT, events_of

MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Hello"},
]
PROMPT_TOKENS = len(encode(apply_chat_template([("system", "Answer briefly."), ("user", "Hello")])))
ARGS: dict[str, Any] = {"model": "tiny-gpt", "max_completion_tokens": 6, "temperature": 0}
BLOCK = 16  # tokens per KV block: the continuous batcher's default on the torch engine


def counts(usage: CompletionUsage) -> tuple[int, int, int]:
    return usage.prompt_tokens, usage.completion_tokens, usage.total_tokens


async def check_clients(base_url: str) -> None:
    """Async and sync clients, streamed and not, all give the same greedy text and usage."""
    async with AsyncOpenAI(base_url=base_url, api_key="unused", timeout=30) as client:
        answer = await client.chat.completions.create(messages=MESSAGES, seed=7, **ARGS)
        stream = await client.chat.completions.create(
            messages=MESSAGES, seed=7, stream=True, stream_options={"include_usage": True}, **ARGS
        )
        chunks = [chunk async for chunk in stream]
    assert answer.id.startswith("chatcmpl-") and answer.object == "chat.completion"
    (choice,) = answer.choices
    assert (choice.index, choice.message.role, choice.finish_reason) == (0, "assistant", "length")
    assert choice.message.content
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (PROMPT_TOKENS, 6)
    assert answer.usage.total_tokens == PROMPT_TOKENS + 6
    assert answer.usage.prompt_tokens_details is not None
    assert answer.usage.prompt_tokens_details.cached_tokens is not None

    *content, usage_chunk = chunks
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1
    assert content[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in content) == choice.message.content
    assert content[-1].choices[0].finish_reason == "length"
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert counts(usage_chunk.usage) == counts(answer.usage)
    assert usage_chunk.usage.prompt_tokens_details is not None
    assert usage_chunk.usage.prompt_tokens_details.cached_tokens is not None

    def run_sync() -> tuple[str | None, str]:
        with OpenAI(base_url=base_url, api_key="unused", timeout=30) as client:
            answer = client.chat.completions.create(messages=MESSAGES, seed=7, **ARGS)
            stream = client.chat.completions.create(messages=MESSAGES, seed=7, stream=True, **ARGS)
            streamed = "".join(c.choices[0].delta.content or "" for c in stream)
        return answer.choices[0].message.content, streamed

    assert await asyncio.to_thread(run_sync) == (choice.message.content,) * 2


async def test_openai_clients_chat_with_a_replica(start_replica: Start) -> None:
    await check_clients(f"{await start_replica()}/v1")


async def test_openai_clients_chat_through_a_gateway(start_replica: Start, tmp_path: Path) -> None:
    urls = [await start_replica(), await start_replica()]
    path = tmp_path / "gateway.yaml"
    write_config(path, {"replicas": [{"url": url} for url in urls]})
    async with running_gateway(path) as gateway:
        await check_clients(f"{gateway.url}/v1")
    # running_gateway has asserted that every replica's outstanding counts are back at zero


async def test_a_stream_is_role_then_content_then_finish_then_usage_then_done(
    start_replica: Start,
) -> None:
    url = await start_replica()
    body = {"messages": MESSAGES, "max_tokens": 4, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        async with session.post(f"{url}/v1/chat/completions", json=body) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "text/event-stream"
            events = events_of(await response.read())
    assert [kind for kind, _ in events] == [""] * len(events)
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(data) for _, data in events[:-1]]
    *deltas, last, usage = chunks
    assert {(c["id"], c["created"], c["model"], c["object"]) for c in chunks} == {
        (chunks[0]["id"], chunks[0]["created"], "tiny-gpt", "chat.completion.chunk")
    }
    assert deltas[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(set(c["choices"][0]["delta"]) == {"content"} for c in deltas[1:])
    assert all(c["choices"][0]["finish_reason"] is None for c in deltas)
    assert last["choices"] == [
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    ]
    assert usage["choices"] == []
    cached = usage["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert isinstance(cached, int)
    assert usage["usage"] == {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": 4,
        "total_tokens": PROMPT_TOKENS + 4,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def chat(**fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2} | fields


USER = {"role": "user", "content": "x"}
LONG = len(encode(apply_chat_template([("user", "x" * 200)])))
BAD: list[tuple[dict[str, Any], str]] = [
    ({"max_tokens": 2}, "messages: field required"),
    (chat(messages=[]), "messages: List should have at least 1 item"),
    (chat(messages={"role": "user"}), "messages: Input should be a valid list"),
    (chat(messages=[USER, USER, {"role": "tool", "content": "x"}]), "messages[2].role: "),
    (chat(messages=[{"role": "user", "content": 5}]), "messages[0].content: "),
    (
        chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
        "messages[0].content[0].type: ",
    ),
    (chat(messages=[{"role": "user"}]), "messages[0].content: Field required"),
    (chat(n=2), "n: "),
    (chat(max_tokens="2"), "max_tokens: Input should be a valid integer"),
    (chat(max_completion_tokens=-1), "max_completion_tokens: "),
    (chat(temperature="hot"), "temperature: "),
    (chat(stream="yes"), "stream: "),
    (chat(max_completion_tokens=500), "max_completion_tokens: 500 is over this model's limit"),
    (
        chat(messages=[{"role": "user", "content": "x" * 200}], max_tokens=100),
        f"messages: {LONG} tokens plus max_tokens 100 exceed the context length 256",
    ),
]


async def test_bad_chat_bodies_get_a_400_naming_the_field(start_replica: Start) -> None:
    url = await start_replica()
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        for body, needle in BAD:
            for stream in (False, True):
                payload = {"stream": stream} | body
                async with session.post(f"{url}/v1/chat/completions", json=payload) as response:
                    error = (await response.json())["error"]
                    assert response.status == 400, (payload, error)
                    assert error["type"] == "invalid_request"
                    assert needle in error["message"], (payload, error)
        async with session.post(f"{url}/v1/chat/completions", json=chat()) as response:
            assert response.status == 200  # still serving
    async with AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=30) as client:
        with pytest.raises(BadRequestError, match="n: "):
            await client.chat.completions.create(messages=MESSAGES, n=2, **ARGS)


async def test_invocations_with_messages_is_a_chat_completion(start_replica: Start) -> None:
    url = await start_replica()
    body = {"messages": MESSAGES, "max_tokens": 3, "temperature": 0}
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        async with session.post(f"{url}/invocations", json=body) as response:
            assert response.status == 200
            answer = await response.json()
        async with session.post(f"{url}/invocations", json=body | {"stream": True}) as response:
            events = events_of(await response.read())
        async with session.post(f"{url}/invocations", json=chat(messages=[])) as response:
            assert response.status == 400
            assert "messages: " in (await response.json())["error"]["message"]
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["role"] == "assistant"
    assert answer["usage"]["completion_tokens"] == 3
    chunks = [json.loads(data) for _, data in events[:-1]]
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed == answer["choices"][0]["message"]["content"]
    assert events[-1][1] == "[DONE]"


async def test_each_turn_of_a_chat_is_served_from_the_prefix_cache(start_replica: Start) -> None:
    """The template is prefix-stable, so the next turn finds every full KV block of this one in
    the cache: its prompt and its reply as generated, less the last token (whose KV is never
    computed: nothing was fed after it)."""
    url = await start_replica()
    messages = list(MESSAGES)
    computed = 0  # the tokens whose KV the previous turn left
    async with AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=30) as client:
        for turn in range(3):
            answer = await client.chat.completions.create(messages=messages, **ARGS)
            assert answer.usage is not None and answer.usage.prompt_tokens_details is not None
            assert answer.usage.prompt_tokens_details.cached_tokens == computed // BLOCK * BLOCK
            computed = answer.usage.total_tokens - 1
            reply = answer.choices[0].message.content or ""
            messages += [
                {"role": "assistant", "content": reply},
                {"role": "user", "content": f"{turn}?"},
            ]


async def test_completions_usage_sums_cached_tokens_over_prompts(start_replica: Start) -> None:
    url = await start_replica()
    body = {"prompt": ["x" * 40, "x" * 40], "max_tokens": 2, "temperature": 0}  # 41 tokens each
    stream = body | {"stream": True, "stream_options": {"include_usage": True}}
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        async with session.post(f"{url}/v1/completions", json=body) as response:
            assert response.status == 200  # fills the cache
        async with session.post(f"{url}/v1/completions", json=body) as response:
            usage = (await response.json())["usage"]
        async with session.post(f"{url}/v1/completions", json=stream) as response:
            events = events_of(await response.read())
    assert usage == {
        "prompt_tokens": 2 * 41,
        "completion_tokens": 2 * 2,
        "total_tokens": 2 * 43,
        "prompt_tokens_details": {"cached_tokens": 2 * (41 // BLOCK * BLOCK)},
    }
    assert events[-1][1] == "[DONE]"
    assert json.loads(events[-2][1])["usage"] == usage


async def test_a_chat_stream_failing_mid_way_ends_with_an_error_event_and_no_done(
    start_replica: Start,
) -> None:
    url = await start_replica(small_config() | {"engine": {"fail_every_n_steps": 5}})
    body = {"messages": MESSAGES, "max_tokens": 20, "temperature": 0, "stream": True}
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        async with session.post(f"{url}/v1/chat/completions", json=body) as response:
            assert response.status == 200
            events = events_of(await response.read())
    kinds, data = zip(*events, strict=True)
    assert kinds[-1] == "error" and set(kinds[:-1]) == {""}
    assert "[DONE]" not in data
    assert json.loads(data[0])["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "mid-stream" in json.loads(data[-1])["error"]["message"]
    async with AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=30) as client:
        chunks = await client.chat.completions.create(messages=MESSAGES, stream=True, **ARGS)
        with pytest.raises(APIError, match="mid-stream"):
            async for _ in chunks:  # steps 6-9 stream, step 10 fails
                pass


async def test_tokenize_gives_the_token_ids_the_cache_is_keyed_by(start_replica: Start) -> None:
    url = await start_replica()
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        async with session.post(f"{url}/tokenize", json={"messages": MESSAGES}) as response:
            assert response.status == 200
            chat_tokens = await response.json()
        async with session.post(f"{url}/tokenize", json={"prompt": "héllo"}) as response:
            prompt_tokens = await response.json()
        async with session.post(f"{url}/tokenize", json={"prompt": 5}) as response:
            assert response.status == 400
            assert (await response.json())["error"]["message"].startswith("prompt")
    pairs = [(m["role"], m["content"]) for m in MESSAGES]
    assert chat_tokens["tokens"] == list(encode(apply_chat_template(pairs)))
    assert chat_tokens["count"] == len(chat_tokens["tokens"])
    assert prompt_tokens["tokens"] == [256, *"héllo".encode()]
