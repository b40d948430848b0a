"""The /cache/blocks parser, on recorded and hostile answers: 16 lowercase hex digits a block,
as our replica writes them, and the hashing it says it uses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gateway.control.cache_blocks import BadReport, blocks, read_blocks
from gateway.control.probe import PROBE_FAILURES
from gateway.routing.prefix import HASH_SCHEME, TOKENIZER

ANSWERS = Path(__file__).parent / "answers"


def test_our_replicas_answer_is_read_with_its_hashing() -> None:
    report = read_blocks(200, (ANSWERS / "cache_blocks.json").read_bytes())
    assert report is not None
    assert report.hashes == [0x9F2C4A1BE07D3C55, 1, 2**64 - 1]
    assert report.hashing == {"hash_scheme": HASH_SCHEME, "tokenizer": TOKENIZER, "block_size": 16}


def test_a_replica_without_a_prefix_cache_says_nothing() -> None:
    assert read_blocks(400, b"") is None and read_blocks(404, b"") is None
    report = read_blocks(200, b'{"blocks": []}')
    assert report is not None and report.hashes == []
    assert report.hashing == {"hash_scheme": None, "tokenizer": None, "block_size": None}


def test_blocks_are_read_as_64_bit_hashes() -> None:
    assert blocks({"blocks": ["0000000000000001", "ffffffffffffffff"]}) == [1, 2**64 - 1]
    assert blocks({"blocks": []}) == []


@pytest.mark.parametrize(
    "report",
    [
        None, [], "blocks", {"blocks": None}, {"blocks": {"a": 1}},
        {"blocks": [1]}, {"blocks": ["1"]}, {"blocks": ["f" * 17]}, {"blocks": ["F" * 16]},
        {"blocks": ["\u0663" * 16]}, {"blocks": ["0x" + "0" * 14]}, {"blocks": [" " + "0" * 15]},
        {"blocks": ["0" * 16, None]}, {"blocks": [2**64]}, {"blocks": [float("nan")]},
    ],
)  # fmt: skip
def test_anything_else_is_a_bad_report(report: Any) -> None:
    with pytest.raises(BadReport):
        blocks(report)
    with pytest.raises(BadReport):
        read_blocks(200, json.dumps(report).encode())


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000 + b"]" * 100_000,  # deep
        b"\xff\xfe\x00not UTF-8",
        b'{"blocks": ["000000000000',  # truncated
        b"<html><body>502 Bad Gateway</body></html>",  # a proxy's page with a 200
        b'{"blocks": [], "block_size": ' + b"9" * 5000 + b"}",  # past int()'s digit limit
        b"",
    ],
    ids=["deep", "not-utf8", "truncated", "html", "huge-int", "empty"],
)
def test_a_hostile_answer_raises_one_of_the_probe_failures(body: bytes) -> None:
    with pytest.raises(PROBE_FAILURES):
        read_blocks(200, body)


def test_duplicate_keys_take_the_last_and_an_over_long_line_is_just_long() -> None:
    report = read_blocks(200, b'{"blocks": [1], "blocks": ["00000000000000ff"]}')
    assert report is not None and report.hashes == [255]
    many = json.dumps({"blocks": [f"{h:016x}" for h in range(50_000)]}).encode()  # one line
    report = read_blocks(200, many)
    assert report is not None and len(report.hashes) == 50_000
