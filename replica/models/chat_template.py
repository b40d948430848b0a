"""The chat template of the byte-level models: a conversation as the text that is encoded.

`/v1/chat/completions` (replica/routes/chat.py) renders its `messages` here, then encodes the
text with the byte tokenizer (`tokenizer.encode`, which puts `BOS` first). Each message is
`<|{role}|>\\n{content}\\n`, a list of text parts reading as its texts joined with no separator,
and the generation prompt `<|assistant|>\\n` ends the text:

    <|system|>\\nBe brief.\\n<|user|>\\nHi\\n<|assistant|>\\n

The template is prefix-stable: a conversation's text is a prefix of the text of the same
conversation followed by the assistant's reply (as generated) and a new message, so each turn of
a chat re-sends a prompt whose tokens start with the previous turn's prompt and reply, which a
prefix KV cache can serve. Nothing is trimmed or escaped, so no later message changes how an
earlier one renders.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

Role = Literal["system", "user", "assistant"]
GENERATION_PROMPT = "<|assistant|>\n"


def render_message(role: Role, content: str) -> str:
    return f"<|{role}|>\n{content}\n"


def apply_chat_template(messages: Iterable[tuple[Role, str]]) -> str:
    """`(role, content)` pairs, in order, as the prompt text that asks for the next reply."""
    return "".join(render_message(role, content) for role, content in messages) + GENERATION_PROMPT
