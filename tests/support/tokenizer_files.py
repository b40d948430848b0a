"""A small but real Hugging Face tokenizer on disk, laid out as a model repository has it:
`tokenizer.json` (a byte-level BPE trained here with the `tokenizers` library, whose
post-processor puts `<s>` before a prompt) and `tokenizer_config.json` (the special tokens and a
ChatML chat template that writes `bos_token` itself and relies on trim_blocks/lstrip_blocks).

`chat_ids` and `completion_ids` are what an engine such as vLLM computes for a request, written
here from the engine's documented behaviour with plain jinja2 and `tokenizers` (never with the
gateway's tokenizer code), so tests compare two implementations: a chat's messages rendered by
the template (text parts joined by newlines, add_generation_prompt) and encoded without special
tokens; a completion's prompt encoded with them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2, 3
BOS_ID = 0
CHAT_TEMPLATE = """\
{% for message in messages %}
{% if loop.first %}{{ bos_token }}{% endif %}
{% if message['role'] not in ['system', 'user', 'assistant'] %}
{{ raise_exception('Conversation roles must be system, user or assistant') }}
{% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] | trim }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"""
TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A careful assistant answers the question it is
asked, briefly and politely. You are a helpful assistant; keep your answers short and true.
Hello there! How are you today? What is the capital of France? Paris is the capital of France.
Tell me a story about a robot who learns to paint. Once upon a time, in a small town by the
sea, there lived a robot named Ada. She wanted to paint the waves, the boats and the sky.
Summarize the following document in three sentences. The report describes the sales of the
last quarter, which grew by ten percent compared with the quarter before it.
"""


def write_tokenizer(directory: Path, *, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """Write tokenizer.json and tokenizer_config.json into `directory` (made if missing) and
    return it. `chat_template=None` leaves the template out, as a base model's files do."""
    directory.mkdir(parents=True, exist_ok=True)
    _train().save(str(directory / "tokenizer.json"))
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False,
                      "normalized": False, "rstrip": False, "single_word": False},
        "eos_token": "<|im_end|>",
        "model_max_length": 4096,
    }  # fmt: skip
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return directory


def _train() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT.splitlines(), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    return tokenizer


def completion_ids(directory: Path, prompt: str) -> list[int]:
    """A completion prompt's ids as the engine computes them: with special tokens (BOS)."""
    return _tokenizer(directory).encode(prompt, add_special_tokens=True).ids


def chat_ids(
    directory: Path, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True
) -> list[int]:
    """A chat's ids as the engine computes them: the template renders the messages (BOS
    included) and the text is encoded without adding special tokens."""
    return (
        _tokenizer(directory)
        .encode(
            chat_text(directory, messages, add_generation_prompt=add_generation_prompt),
            add_special_tokens=False,
        )
        .ids
    )


def chat_text(
    directory: Path, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True
) -> str:
    """The chat template's output for `messages` (content given as parts becomes its texts
    joined by newlines, as vLLM passes it to a template that reads content as a string)."""
    config = json.loads((directory / "tokenizer_config.json").read_text())
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, autoescape=False)
    env.globals["raise_exception"] = _raise
    flat = [{**m, "content": _as_string(m["content"])} for m in messages]
    return env.from_string(config["chat_template"]).render(
        messages=flat,
        add_generation_prompt=add_generation_prompt,
        bos_token=config["bos_token"]["content"],
        eos_token=config["eos_token"],
    )


def _as_string(content: str | list[dict[str, str]]) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(part["text"] for part in content if part["text"])


def _tokenizer(directory: Path) -> Tokenizer:
    return Tokenizer.from_file(str(directory / "tokenizer.json"))


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)
