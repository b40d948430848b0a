"""The chat template: its exact text, and the prefix property a prefix KV cache relies on."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from replica.models.chat_template import Role, apply_chat_template
from replica.models.tokenizer import encode

ROLES: list[Role] = ["system", "user", "assistant"]
messages = st.lists(st.tuples(st.sampled_from(ROLES), st.text()), min_size=1, max_size=6)


def test_each_message_and_the_generation_prompt_read_as_documented() -> None:
    text = apply_chat_template([("system", "Be brief."), ("user", "Hi")])
    assert text == "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"


@given(messages, st.text(), st.text())
def test_the_next_turn_starts_with_this_turn(
    conversation: list[tuple[Role, str]], reply: str, follow_up: str
) -> None:
    """The text, and so the tokens, of a conversation is a prefix of the same conversation
    followed by the assistant's reply (exactly as generated) and a new user message."""
    turn = apply_chat_template(conversation)
    next_turn = apply_chat_template([*conversation, ("assistant", reply), ("user", follow_up)])
    assert next_turn.startswith(turn)
    assert encode(next_turn)[: len(encode(turn))] == encode(turn)


@given(messages, messages)
def test_an_earlier_message_renders_the_same_whatever_follows(
    head: list[tuple[Role, str]], tail: list[tuple[Role, str]]
) -> None:
    without_prompt = apply_chat_template(head).removesuffix("<|assistant|>\n")
    assert apply_chat_template([*head, *tail]).startswith(without_prompt)
