"""The usage a response names: in a whole body (read without parsing it, never from a model's
text) and in a stream's usage chunk (the last one counts; `"usage": null` chunks do not)."""

from __future__ import annotations

import json

import pytest

from gateway.datapath.sse import SseCounter
from gateway.datapath.usage import usage_of_body
from gateway.flow.service import Usage


@pytest.mark.parametrize(
    ("body", "usage"),
    [
        ({"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 40}}, Usage(12, 40)),
        (
            {
                "usage": {
                    "prompt_tokens": 3,
                    "prompt_tokens_details": {"cached_tokens": 1},
                    "completion_tokens": 4,
                }
            },
            Usage(3, 4),
        ),
        ({"data": [], "usage": {"prompt_tokens": 7, "total_tokens": 7}}, Usage(7, 0)),  # embeddings
        ({"choices": [{"text": '"prompt_tokens": 99'}], "usage": None}, None),  # the model's text
        ({"choices": []}, None),
    ],
)
def test_the_usage_of_a_whole_body(body: dict[str, object], usage: Usage | None) -> None:
    assert usage_of_body(json.dumps(body).encode()) == usage


def _event(payload: object) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def test_a_streams_usage_chunk_is_read_and_its_null_usages_are_not() -> None:
    counter = SseCounter(wants_usage=True)
    chunk = {"choices": [{"text": "x"}], "usage": None}
    assert counter.feed(_event(chunk) + _event(chunk)) == 2
    assert counter.usage is None
    last = _event({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}})
    counter.feed(last[:20])  # split anywhere
    counter.feed(last[20:] + b"data: [DONE]\n\n")
    assert counter.usage == Usage(5, 2) and not counter.failed


def test_without_wanting_it_a_stream_is_not_read_for_usage() -> None:
    counter = SseCounter()
    counter.feed(_event({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}))
    assert counter.usage is None
