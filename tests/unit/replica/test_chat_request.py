"""Chat completion requests: what is accepted, how a bad one is named, how its chunks read."""

from __future__ import annotations

from typing import Any

import pytest

from replica.api.schemas import parse_chat_completion
from replica.errors import BadRequest
from replica.generation import TokenEvent
from replica.routes.chat import CHAT

USER = {"role": "user", "content": "Hi"}


def test_messages_become_one_prompt_through_the_template() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    system = {"role": "system", "content": "Be brief."}
    body = {
        "messages": [system, {"role": "user", "content": parts}],
        "logit_bias": {"1": 2},  # unknown to us: ignored, as OpenAI's newer fields are
    }
    req = parse_chat_completion(body)
    assert req.prompts == ["<|system|>\nBe brief.\n<|user|>\nab\n<|assistant|>\n"]
    assert (req.temperature, req.budget) == (1.0, ("max_tokens", 16))


@pytest.mark.parametrize(
    ("limits", "budget"),
    [
        ({"max_tokens": 5}, ("max_tokens", 5)),
        ({"max_completion_tokens": 7}, ("max_completion_tokens", 7)),
        ({"max_tokens": 5, "max_completion_tokens": 7}, ("max_completion_tokens", 7)),
    ],
)
def test_max_completion_tokens_wins_over_max_tokens(
    limits: dict[str, int], budget: tuple[str, int]
) -> None:
    assert parse_chat_completion({"messages": [USER], **limits}).budget == budget


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({}, "messages: field required"),
        ({"messages": []}, "messages: List should have at least 1 item"),
        ({"messages": "Hi"}, "messages: Input should be a valid list"),
        ({"messages": [USER, USER, {"role": "tool", "content": "x"}]}, r"messages\[2\].role: "),
        ({"messages": [{"role": "user", "content": 5}]}, r"messages\[0\].content: "),
        ({"messages": [{"role": "user"}]}, r"messages\[0\].content: Field required"),
        ({"messages": [{"content": "x"}]}, r"messages\[0\].role: Field required"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            r"messages\[0\].content\[0\].type: Input should be 'text'",
        ),
        ({"messages": [USER], "n": 2}, "n: "),
        ({"messages": [USER], "max_completion_tokens": 0}, "max_completion_tokens: "),
        ({"messages": [USER], "max_tokens": "4"}, "max_tokens: Input should be a valid integer"),
        ({"messages": [USER], "temperature": "0"}, "temperature: "),
        ({"messages": [USER], "stop": 3}, "stop: "),
        ({"messages": [USER], "stream_options": {"include_usage": 1}}, "stream_options."),
    ],
)
def test_bad_chat_requests_are_named(payload: dict[str, Any], message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        parse_chat_completion(payload)


def test_a_stream_opens_with_the_role_and_closes_with_an_empty_delta() -> None:
    first = CHAT.deltas(0, TokenEvent(72, "H"), first=True)
    held = CHAT.deltas(0, TokenEvent(105, ""), first=False)  # held back: could start a stop
    last = CHAT.deltas(0, TokenEvent(33, "i!", "length"), first=False)
    assert [c["delta"] for c in first] == [{"role": "assistant", "content": ""}, {"content": "H"}]
    assert held == []
    assert [(c["delta"], c["finish_reason"]) for c in last] == [
        ({"content": "i!"}, None),
        ({}, "length"),
    ]
