"""Bodies a hostile client sends (nested 5,000 deep, nested just past the limit, digits that
are not ASCII, an integer of 5,000 digits, a KServe object where an object is wrong) get a 400
from every endpoint that reads a body, never a 500; the replica keeps serving, with nothing
left in flight."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from replica.api.body import MAX_DEPTH

from .conftest import Start

PATHS = ["/v1/completions", "/v1/chat/completions", "/tokenize",
         "/v2/models/classifier/infer", "/invocations"]  # fmt: skip
COMPLETION = b'{"prompt": "hi", "max_tokens": 2, '
TENSOR = {"name": "input", "datatype": "FP32", "shape": [1, 16], "data": [0.5] * 16}


def nested(depth: int, open_: str = "[", close: str = "]") -> bytes:
    return (open_ * depth + close * depth).encode()


# (what, body): each nests past MAX_DEPTH somewhere a client may put JSON.
DEEP: list[tuple[str, bytes]] = [
    ("5000 arrays at the top", nested(5000)),
    ("5000 arrays in an ignored field", COMPLETION + b'"x": ' + nested(5000) + b"}"),
    ("5000 objects", b'{"a":' * 5000 + b"1" + b"}" * 5000),
    ("one past the limit", COMPLETION + b'"x": ' + nested(MAX_DEPTH) + b"}"),
    ("in chat content", b'{"messages": [{"role": "user", "content": ' + nested(5000) + b"}]}"),
    ("in a tensor", b'{"inputs": [{"name": "input", "data": ' + nested(5000) + b"}]}"),
    ("in the stop list", COMPLETION + b'"stop": ' + nested(300) + b"}"),
    ("unterminated", b"[" * 5000),
]


async def _load_is_idle(session: aiohttp.ClientSession, url: str) -> None:
    async with session.get(f"{url}/ping") as response:
        load = response.headers["X-Replica-Load"]
    assert "queued=0,running=0," in load and "inflight=0," in load, load


@pytest.mark.parametrize("path", PATHS)
async def test_deeply_nested_bodies_are_a_400_naming_the_limit(
    start_replica: Start, path: str
) -> None:
    url = await start_replica()
    async with aiohttp.ClientSession() as session:
        for what, body in DEEP:
            for headers in ({}, {"Idempotency-Key": f"k-{what}"}):
                async with session.post(url + path, data=body, headers=headers) as response:
                    payload = await response.json()
                assert response.status == 400, (what, payload)
                assert f"deeper than {MAX_DEPTH} levels" in str(payload["error"]), (what, payload)
        await _load_is_idle(session, url)


async def test_nesting_up_to_the_limit_is_served(start_replica: Start) -> None:
    at_limit = COMPLETION + b'"x": ' + nested(MAX_DEPTH - 1) + b"}"
    brackets_in_text = COMPLETION + b'"x": "\\\\\\"' + b"[{" * 5000 + b'"}'  # in a string
    url = await start_replica()
    async with aiohttp.ClientSession() as session:
        for body in (at_limit, brackets_in_text):
            async with session.post(f"{url}/v1/completions", data=body) as response:
                assert response.status == 200, await response.text()
        async with session.post(
            f"{url}/invocations", json={"inputs": [TENSOR], "id": [[["deep", "id"]]]}
        ) as response:
            assert response.status == 200 and (await response.json())["id"] == "[[['deep', 'id']]]"
        await _load_is_idle(session, url)


def _tensor(**overrides: Any) -> dict[str, Any]:
    return {"inputs": [TENSOR | overrides]}


# (path, body or raw bytes, headers, what the message names)
OTHER: list[tuple[str, Any, dict[str, str], str]] = [
    ("/v1/completions", b'{"prompt": "x", "seed": ' + b"1" * 5000 + b"}", {}, "not valid JSON"),
    ("/v2/models/classifier/infer", b"{}", {"Inference-Header-Content-Length": "\u00b2"},
     "Inference-Header-Content-Length"),
    ("/v2/models/classifier/infer", b"{}", {"Inference-Header-Content-Length": "9" * 5000},
     "Inference-Header-Content-Length"),
    ("/invocations", b"{}", {"Inference-Header-Content-Length": "\u0661"},
     "Inference-Header-Content-Length"),
    ("/v2/models/classifier/infer", _tensor(parameters=[1]), {}, "parameters"),
    ("/v2/models/classifier/infer", _tensor(parameters={"binary_data_size": "64"}), {},
     "binary_data_size"),
    ("/v2/models/classifier/infer", {**_tensor(), "parameters": "yes"}, {}, "parameters"),
    ("/v2/models/classifier/infer",
     {**_tensor(), "outputs": [{"name": "logits", "parameters": [True]}]}, {}, "parameters"),
]  # fmt: skip


async def test_other_malformed_inputs_are_a_400_naming_the_field(start_replica: Start) -> None:
    url = await start_replica()
    async with aiohttp.ClientSession() as session:
        for path, body, headers, needle in OTHER:
            kwargs: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
            async with session.post(url + path, headers=headers, **kwargs) as response:
                payload = await response.json()
            assert response.status == 400 and needle in str(payload["error"]), (path, payload)
        async with session.post(f"{url}/v2/models/classifier/infer", json=_tensor()) as response:
            assert response.status == 200
        await _load_is_idle(session, url)
