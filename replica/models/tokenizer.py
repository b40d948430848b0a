"""Byte-level tokenizer: token i < 256 is byte i, `BOS` (256) starts every prompt.

Any UTF-8 text round-trips; a prompt of n bytes is n + 1 tokens.
"""

from __future__ import annotations

BOS = 256
VOCAB_SIZE = 257
PRINTABLE = (*range(32, 127), 10)  # the bytes an untrained (random-weight) model may emit
DESCRIPTION = "bytes: BOS (256) then the UTF-8 bytes of the prompt"  # as /cache/blocks says


def encode(text: str) -> tuple[int, ...]:
    return (BOS, *text.encode("utf-8"))


def decode(token_ids: list[int] | tuple[int, ...]) -> str:
    return bytes(t for t in token_ids if t < 256).decode("utf-8", errors="replace")
