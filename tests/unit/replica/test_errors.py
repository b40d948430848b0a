"""One key-path syntax for every validation error in the replica, and errors below the layers."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from replica.api.schemas import parse_completion
from replica.config import ConfigError, parse_config
from replica.errors import BadRequest, key_path


@pytest.mark.parametrize(
    ("loc", "raw", "expected"),
    [
        (("models", 1, "classifier", "batcher", "dynamic", "x"),
         {"models": [{}, {"kind": "classifier", "batcher": {"kind": "dynamic", "x": 1}}]},
         "models[1].batcher.x"),
        (("prompt", "list[str]", 1), {"prompt": ["a", 3]}, "prompt[1]"),
        (("prompt", "str"), {"prompt": 3}, "prompt"),
        (("models", 0, "tiny-gpt"), {"models": [{"kind": "tiny-gpt"}]}, "models[0]"),
        ((), {"a": 1}, "(root)"),
    ],
)  # fmt: skip
def test_key_path_names_only_keys_the_user_wrote(
    loc: tuple[int | str, ...], raw: Any, expected: str
) -> None:
    assert key_path(loc, raw) == expected


def test_a_missing_key_is_named() -> None:
    raw = {"generation": {"prefill_base_s": 1}}
    assert key_path(("generation", "decode_base_s"), raw, missing=True) == (
        "generation.decode_base_s"
    )


def test_config_and_request_errors_use_the_same_syntax() -> None:
    with pytest.raises(ConfigError, match=r"^models\[0\]\.params\.hidden_sizes\[1\]: "):
        parse_config({"models": [{"kind": "classifier", "params": {"hidden_sizes": [1, "a"]}}]})
    with pytest.raises(BadRequest, match=r"^prompt: .*; prompt\[1\]: Input should be a valid"):
        parse_completion({"prompt": ["a", 3]})
    with pytest.raises(BadRequest, match=r"^stream_options\.include_usage: "):
        parse_completion({"prompt": "a", "stream_options": {"include_usage": "yes"}})


def test_batching_does_not_import_the_api_package() -> None:
    code = (
        "import sys, replica.batching, replica.batching.testing, replica.engines.base\n"
        "print(sorted(m for m in sys.modules if m.startswith('replica.api')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
