"""Bad input gets a 4xx naming the problem, and the replica keeps serving afterwards."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from .conftest import Start, small_config

GOOD_ROW = [0.5] * 16


def tensor(**overrides: Any) -> dict[str, Any]:
    base = {"name": "input", "datatype": "FP32", "shape": [1, 16], "data": GOOD_ROW}
    return {"inputs": [base | overrides]}


CASES: list[tuple[str, str, Any, int, str]] = [
    ("POST", "/v1/completions", {"max_tokens": 4}, 400, "prompt: field required"),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 500}, 400, "limit of 128"),
    ("POST", "/v1/completions", {"prompt": "x" * 250, "max_tokens": 100}, 400, "context length"),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": "4"}, 400, "valid integer"),
    ("POST", "/v1/completions", {"prompt": ["a", 3]}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": "x", "model": "gpt-9"}, 404, "'gpt-9' is not served"),
    ("POST", "/v1/completions", {"prompt": "x", "model": "classifier"}, 400, "is a classifier"),
    ("POST", "/v1/completions", b"{not json", 400, "not valid JSON"),
    ("POST", "/v1/completions", b"[1, 2]", 400, "must be a JSON object"),
    ("POST", "/v2/models/classifier/infer", tensor(shape=[1, 15]), 400, "does not match"),
    ("POST", "/v2/models/classifier/infer", tensor(datatype="FP64"), 400, "must be FP32"),
    ("POST", "/v2/models/classifier/infer", tensor(data=[1] * 15), 400, "15 values"),
    ("POST", "/v2/models/classifier/infer", {"inputs": "x"}, 400, "inputs"),
    ("POST", "/v2/models/nope/infer", tensor(), 404, "'nope' is not served"),
    ("POST", "/v2/models/tiny-gpt/infer", tensor(), 400, "is generative"),
    ("GET", "/v2/models/nope", None, 404, "not served"),
    ("GET", "/no/such/path", None, 404, "Not Found"),
    ("GET", "/v1/completions", None, 405, "Method Not Allowed"),
]


def message_of(payload: dict[str, Any]) -> str:
    error = payload["error"]
    return str(error["message"] if isinstance(error, dict) else error)


async def test_each_bad_input_gets_a_4xx_naming_the_problem(start_replica: Start) -> None:
    url = await start_replica()
    async with aiohttp.ClientSession() as session:
        for method, path, body, status, needle in CASES:
            kwargs: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
            async with session.request(method, url + path, **kwargs) as response:
                payload = await response.json()
                assert response.status == status, (path, body, payload)
                assert needle in message_of(payload), (path, body, payload)
                assert "X-Replica-Load" in response.headers
        body = {"prompt": "still here", "max_tokens": 3, "temperature": 0}
        async with session.post(f"{url}/v1/completions", json=body) as response:
            assert response.status == 200
        async with session.post(f"{url}/v2/models/classifier/infer", json=tensor()) as response:
            assert response.status == 200


@pytest.mark.parametrize("path", ["/v1/completions", "/v2/models/classifier/infer", "/invocations"])
async def test_body_too_large_is_413(start_replica: Start, path: str) -> None:
    url = await start_replica(small_config(max_body_bytes=1024))
    async with aiohttp.ClientSession() as session:
        async with session.post(url + path, json={"prompt": "x" * 5000}) as response:
            assert response.status == 413
            assert "too large" in message_of(await response.json()) or "exceeded" in message_of(
                await response.json()
            )
        async with session.get(f"{url}/ping") as response:
            assert response.status == 200
