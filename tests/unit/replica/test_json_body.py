"""The replica's one rule for client JSON (replica/api/body.py): depth measured on the text,
strings skipped, escapes included; a 400 naming the limit, never a RecursionError."""

from __future__ import annotations

import json

import pytest

from gateway.boundedjson import nesting_depth
from replica.api.body import MAX_DEPTH, parse_json_object
from replica.errors import BadRequest


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        ("1", 0),
        ('"[[["', 0),
        ("[]", 1),
        ('{"a": [1, {"b": []}], "c": {}}', 4),
        ('["\\"[", ["\\\\"], "]]]"]', 2),
        ("[" * 5000 + "]" * 5000, 5000),
    ],
)
def test_depth_counts_arrays_and_objects_not_brackets_in_strings(text: str, depth: int) -> None:
    assert nesting_depth(text) == depth


def test_a_body_at_the_limit_parses_and_one_past_it_is_refused() -> None:
    at_limit = {"x": json.loads("[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1))}
    assert parse_json_object(json.dumps(at_limit).encode()) == at_limit
    for body in (b'{"x": ' + b"[" * MAX_DEPTH + b"]" * MAX_DEPTH + b"}", b"[" * 100_000):
        with pytest.raises(BadRequest, match=f"deeper than {MAX_DEPTH} levels"):
            parse_json_object(body)


def test_encodings_and_numbers_are_read_as_json_reads_them() -> None:
    assert parse_json_object(b'\xef\xbb\xbf{"a": 1}') == {"a": 1}  # a UTF-8 BOM
    assert parse_json_object('{"a": "é"}'.encode("utf-16")) == {"a": "é"}
    for bad in (b'{"a": "\xff"}', b'{"a": ' + b"9" * 5000 + b"}", b"[1]"):
        with pytest.raises(BadRequest, match=r"not valid JSON|must be a JSON object"):
            parse_json_object(bad)
