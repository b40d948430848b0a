"""Prompt token ids, pure: the bytes tokenizer gives what prefix.block_hashes hashes, and a
Hugging Face tokenizer read from a model's files gives what an engine computes for the same
request (tests/support/tokenizer_files.py, written apart from the gateway's code)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from gateway.errors import ConfigError
from gateway.routing.prefix import BOS, block_hashes, chain, prompt_text
from gateway.routing.tokens import (
    BytesTokenizer,
    HfTokenizer,
    TokenizerError,
    load_tokenizer,
)
from tests.support.tokenizer_files import (
    BOS_ID,
    chat_ids,
    chat_text,
    completion_ids,
    write_tokenizer,
)

CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
    {"role": "user", "content": "Tell me a story about a robot."},
]


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_tokenizer(tmp_path / "model")


def _with_config(directory: Path, **changes: Any) -> Path:
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, **changes}))
    return directory


# The bytes tokenizer


@given(st.text(max_size=200), st.sampled_from([1, 4, 16]))
@settings(max_examples=200)
def test_bytes_ids_are_what_the_prefix_hashes_hash(text: str, block: int) -> None:
    for payload in (
        {"prompt": text},
        {"prompt": [text, "second"]},
        {"messages": [{"role": "user", "content": text}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]},
    ):
        ids = BytesTokenizer().ids(payload)
        assert ids is not None
        expected_text = prompt_text(payload)
        assert expected_text is not None
        assert tuple(chain(ids, block)) == block_hashes(expected_text, block, 10_000)
        assert ids[0] == BOS
        assert len(ids) == len(expected_text.encode("utf-8", errors="surrogatepass")) + 1


def test_bytes_reads_no_prompt_as_none_and_takes_token_ids_as_they_are() -> None:
    tokenizer = BytesTokenizer()
    assert tokenizer.ids({"input": "embed me"}) is None
    assert tokenizer.ids({"messages": []}) is None
    assert tokenizer.ids({"prompt": [5, 6, 7]}) == [5, 6, 7]
    assert tokenizer.ids({"prompt": [[5, 6], [7]]}) == [5, 6]
    lone_surrogate = "a\ud800b"  # JSON can carry one; prefix hashing passes it through
    assert tokenizer.ids({"prompt": lone_surrogate}) == [BOS, 97, 0xED, 0xA0, 0x80, 98]
    assert tokenizer.name == "bytes"
    assert load_tokenizer("bytes") is load_tokenizer("bytes")
    assert isinstance(load_tokenizer("bytes"), BytesTokenizer)


# A Hugging Face tokenizer: completions


def test_a_completion_prompt_is_encoded_with_the_bos_the_post_processor_adds(model: Path) -> None:
    tokenizer = HfTokenizer.load(model)
    text = "Hello there! The quick brown fox jumps over the lazy dog."
    ids = tokenizer.ids({"prompt": text})
    assert ids == completion_ids(model, text)
    assert ids is not None and ids[0] == BOS_ID and ids.count(BOS_ID) == 1
    assert tokenizer.ids({"prompt": [text, "another prompt"]}) == ids
    assert tokenizer.ids({"prompt": text, "add_special_tokens": False}) == ids[1:]
    assert tokenizer.name == str(model / "tokenizer.json")


def test_completion_token_ids_are_used_as_they_are(model: Path) -> None:
    tokenizer = HfTokenizer.load(model)
    assert tokenizer.ids({"prompt": "a\ud800b"}) is None  # tokenizers cannot take it
    assert tokenizer.ids({"prompt": [9, 8, 7]}) == [9, 8, 7]
    assert tokenizer.ids({"prompt": [[9, 8], [7]]}) == [9, 8]
    for unusable in ([], [-1], [2**32], [True, 2], [1.5], [["a"]], 12, {"a": 1}):
        assert tokenizer.ids({"prompt": unusable}) is None, unusable


# A Hugging Face tokenizer: chat


def test_a_chat_is_rendered_by_the_models_template_and_encoded_once(model: Path) -> None:
    tokenizer = HfTokenizer.load(model)
    ids = tokenizer.ids({"messages": CHAT})
    assert ids == chat_ids(model, CHAT)
    # The template as an engine renders it, anchored on the literal text (trim_blocks and
    # lstrip_blocks leave exactly these newlines) ...
    expected = (
        "<s><|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis is the capital of France.<|im_end|>\n"
        "<|im_start|>user\nTell me a story about a robot.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    raw = Tokenizer.from_file(str(model / "tokenizer.json"))
    assert ids == raw.encode(expected, add_special_tokens=False).ids
    # ... whose BOS is the template's own: the post-processor adds no second one.
    assert ids is not None and ids[0] == BOS_ID and ids.count(BOS_ID) == 1


def test_the_generation_prompt_follows_the_request(model: Path) -> None:
    tokenizer = HfTokenizer.load(model)
    with_prompt = tokenizer.ids({"messages": CHAT})
    without = tokenizer.ids({"messages": CHAT, "add_generation_prompt": False})
    assert without == chat_ids(model, CHAT, add_generation_prompt=False)
    assert with_prompt is not None and without is not None
    assert with_prompt[: len(without)] == without and len(with_prompt) > len(without)
    via_kwargs = {"messages": CHAT, "chat_template_kwargs": {"add_generation_prompt": False}}
    assert tokenizer.ids(via_kwargs) == without


def test_text_parts_are_joined_by_newlines_as_the_engine_joins_them(model: Path) -> None:
    tokenizer = HfTokenizer.load(model)
    parts = [
        {"role": "user", "content": [
            {"type": "text", "text": "Hello there!"},
            {"type": "text", "text": ""},
            {"type": "text", "text": "What is the capital of France?"},
        ]},
    ]  # fmt: skip
    joined = [{"role": "user", "content": "Hello there!\nWhat is the capital of France?"}]
    assert tokenizer.ids({"messages": parts}) == chat_ids(model, parts)
    assert tokenizer.ids({"messages": parts}) == tokenizer.ids({"messages": joined})


@pytest.mark.parametrize(
    "payload",
    [
        {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        ]}]},
        {"messages": [{"role": "user", "content": [{"text": "no type"}]}]},
        {"messages": [{"role": "user", "content": 42}]},
        {"messages": [{"content": "no role"}]},
        {"messages": ["not a message"]},
        {"messages": "not a list"},
        {"messages": []},
        {"messages": [{"role": "user", "content": "Hi"}], "tools": [{"type": "function"}]},
        {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]},
        {"input": "an embedding request"},
    ],
)  # fmt: skip
def test_a_prompt_the_engine_would_build_otherwise_is_none(
    model: Path, payload: dict[str, Any]
) -> None:
    assert HfTokenizer.load(model).ids(payload) is None


def test_a_template_that_refuses_the_messages_gives_none_for_that_request(model: Path) -> None:
    tokenizer = HfTokenizer.load(model)
    refused = [{"role": "tool", "content": "42", "tool_call_id": "call_1"}]
    with pytest.raises(Exception, match="roles must be"):
        chat_text(model, refused)  # the engine refuses it too
    assert tokenizer.ids({"messages": refused}) is None
    assert tokenizer.ids({"messages": CHAT}) == chat_ids(model, CHAT)  # the next one is fine


def test_a_template_error_on_odd_values_gives_none(tmp_path: Path) -> None:
    model = write_tokenizer(tmp_path, chat_template="{{ messages[0]['content'] + 1 }}")
    assert HfTokenizer.load(model).ids({"messages": [{"role": "user", "content": "x"}]}) is None


def test_a_template_that_loops_over_content_gets_text_parts(tmp_path: Path) -> None:
    template = (
        "{{ bos_token }}{% for message in messages %}{{ message['role'] }}:"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}[{{ part['text'] }}]{% endfor %}"
        "{% endif %}{{ '\\n' }}{% endfor %}"
    )
    model = write_tokenizer(tmp_path, chat_template=template)
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, "b"]}]
    raw = Tokenizer.from_file(str(model / "tokenizer.json"))
    expected = raw.encode("<s>user:[a][b]\n", add_special_tokens=False).ids
    assert HfTokenizer.load(model).ids({"messages": parts}) == expected
    plain = [{"role": "user", "content": "a"}]  # a string becomes one part as well
    assert (
        HfTokenizer.load(model).ids({"messages": plain})
        == raw.encode("<s>user:[a]\n", add_special_tokens=False).ids
    )


def test_templates_get_transformers_tojson_and_generation_tag(tmp_path: Path) -> None:
    template = (
        "{% for m in messages %}{% generation %}{{ m | tojson }}{% endgeneration %}{% endfor %}"
        "{{ eos_token }}"
    )
    model = write_tokenizer(tmp_path, chat_template=template)
    messages = [{"role": "user", "content": "<b>Paris & café</b>"}]
    raw = Tokenizer.from_file(str(model / "tokenizer.json"))
    text = '{"role": "user", "content": "<b>Paris & café</b>"}<|im_end|>'
    assert (
        HfTokenizer.load(model).ids({"messages": messages})
        == raw.encode(text, add_special_tokens=False).ids
    )


def test_tools_reach_the_template_only_as_an_empty_list(tmp_path: Path) -> None:
    model = write_tokenizer(tmp_path, chat_template="{% if tools is not none %}T{% endif %}x")
    tokenizer = HfTokenizer.load(model)
    one = [{"role": "user", "content": "Hi"}]
    raw = Tokenizer.from_file(str(model / "tokenizer.json"))
    assert tokenizer.ids({"messages": one}) == raw.encode("x", add_special_tokens=False).ids
    assert tokenizer.ids({"messages": one, "tools": []}) == raw.encode("Tx").ids[1:]
    assert tokenizer.ids({"messages": one, "tools": [{"type": "function"}]}) is None


def test_chat_template_jinja_wins_and_named_templates_give_the_default(model: Path) -> None:
    (model / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[0]['content'] }}")
    raw = Tokenizer.from_file(str(model / "tokenizer.json"))
    one = [{"role": "user", "content": "Hello there!"}]
    assert (
        HfTokenizer.load(model).ids({"messages": one})
        == raw.encode("<s>Hello there!", add_special_tokens=False).ids
    )
    (model / "chat_template.jinja").unlink()
    named = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "d{{ 1 }}"}]
    _with_config(model, chat_template=named)
    assert (
        HfTokenizer.load(model).ids({"messages": one})
        == raw.encode("d1", add_special_tokens=False).ids
    )


def test_without_a_chat_template_only_completions_are_read(tmp_path: Path) -> None:
    model = write_tokenizer(tmp_path, chat_template=None)
    tokenizer = HfTokenizer.load(model)
    assert tokenizer.ids({"messages": CHAT}) is None
    assert tokenizer.ids({"prompt": "Hello"}) == completion_ids(model, "Hello")


def test_llama_classes_take_bos_and_eos_from_the_config(model: Path) -> None:
    data = json.loads((model / "tokenizer.json").read_text())
    (model / "tokenizer.json").write_text(json.dumps({**data, "post_processor": None}))
    eos_id = Tokenizer.from_file(str(model / "tokenizer.json")).token_to_id("<|im_end|>")
    bare = completion_ids(model, "Hello there!")  # tokenizer.json alone adds nothing now
    assert bare[0] != BOS_ID
    _with_config(model, tokenizer_class="LlamaTokenizerFast")
    assert HfTokenizer.load(model).ids({"prompt": "Hello there!"}) == [BOS_ID, *bare]
    _with_config(model, add_bos_token=False, add_eos_token=True)
    assert HfTokenizer.load(model).ids({"prompt": "Hello there!"}) == [*bare, eos_id]


def test_a_saved_truncation_does_not_cut_the_prompt(model: Path) -> None:
    raw = Tokenizer.from_file(str(model / "tokenizer.json"))
    raw.enable_truncation(max_length=4)
    raw.save(str(model / "tokenizer.json"))
    text = "The quick brown fox jumps over the lazy dog."
    ids = HfTokenizer.load(model).ids({"prompt": text})
    assert ids is not None and len(ids) > 4
    assert Tokenizer.from_file(str(model / "tokenizer.json")).encode(text).ids == ids[:4]


# Loading


def test_missing_files_name_what_to_give(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"no such file; give the model's tokenizer.json"):
        HfTokenizer.load(tmp_path / "absent")
    with pytest.raises(TokenizerError, match="no such file"):
        load_tokenizer(str(tmp_path))  # a directory without tokenizer.json
    assert issubclass(TokenizerError, ConfigError)


def test_broken_json_names_the_file(model: Path) -> None:
    (model / "tokenizer_config.json").write_text("{ not json")
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json: cannot read it as JSON"):
        HfTokenizer.load(model)
    (model / "tokenizer_config.json").write_text("[]")
    with pytest.raises(TokenizerError, match="must be a JSON object"):
        HfTokenizer.load(model)
    (model / "tokenizer_config.json").unlink()
    (model / "tokenizer.json").write_text('{"model": "nothing like a tokenizer"}')
    with pytest.raises(TokenizerError, match=r"tokenizer.json: not a Hugging Face tokenizer.json"):
        HfTokenizer.load(model / "tokenizer.json")


def test_a_template_that_does_not_compile_is_a_load_error(tmp_path: Path) -> None:
    model = write_tokenizer(tmp_path, chat_template="{% for m in messages %}{{ m }")
    with pytest.raises(TokenizerError, match=r"chat template does not compile \(line 1"):
        HfTokenizer.load(model)


def test_a_file_path_works_as_its_directory_and_without_a_config(model: Path) -> None:
    (model / "tokenizer_config.json").unlink()
    tokenizer = HfTokenizer.load(model / "tokenizer.json")
    assert tokenizer.ids({"prompt": "Hello"}) == completion_ids(model, "Hello")
    assert tokenizer.ids({"messages": CHAT}) is None


def test_load_tokenizer_reads_unchanged_files_once(model: Path) -> None:
    first = load_tokenizer(str(model))
    assert load_tokenizer(str(model)) is first
    assert load_tokenizer(str(model / "tokenizer.json")) is first
    assert isinstance(first, HfTokenizer)
    # A new template (the config file's mtime moves) is read again, and takes effect.
    _with_config(model, chat_template="{{ bos_token }}changed")
    stat = (model / "tokenizer_config.json").stat()
    os.utime(model / "tokenizer_config.json", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = load_tokenizer(str(model))
    assert second is not first
    assert second.ids({"messages": CHAT}) == completion_ids(model, "changed")
    assert load_tokenizer(str(model)) is second


# What routing reads: the first ids and the length


@given(st.text(max_size=120), st.integers(0, 40))
@settings(max_examples=200)
def test_the_bytes_head_is_the_first_ids_and_the_whole_length(text: str, n: int) -> None:
    tokenizer = BytesTokenizer()
    for payload in ({"prompt": text}, {"messages": [{"role": "user", "content": text}]}):
        ids = tokenizer.ids(payload)
        assert ids is not None and tokenizer.head(payload, n) == (ids[:n], len(ids))
    assert tokenizer.head({"prompt": [5, 6, 7]}, 2) == ([5, 6], 3)
    assert tokenizer.head({"input": text}, n) is None


def test_the_hf_head_is_the_first_ids_and_the_whole_length(model: Path) -> None:
    tokenizer = HfTokenizer.load(model)
    for payload in ({"prompt": "Tell me a story about a robot."}, {"messages": CHAT}):
        ids = tokenizer.ids(payload)
        assert ids is not None and len(ids) > 8
        assert tokenizer.head(payload, 8) == (ids[:8], len(ids))
    assert tokenizer.head({"messages": []}, 8) is None
