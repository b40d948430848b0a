"""Client JSON bodies: every route that reads one (OpenAI, chat, tokenize, KServe v2, SageMaker)
parses it here, so one rule holds everywhere.

The rule: a body is one JSON object, in UTF-8 (or UTF-16/32, as Python's json detects), nested
at most `MAX_DEPTH` arrays and objects deep. Depth is measured on the text before it is parsed,
so a body nested 5,000 deep is a 400 naming the limit, not a `RecursionError` in the parser,
in pydantic or in `json.dumps` of a value we echo. 64 leaves room for any real request (chat
content parts sit 4 deep, a KServe tensor 4 or 5) and keeps every recursive walk short.
"""

from __future__ import annotations

import json
import re
from array import array
from itertools import accumulate
from typing import Any

from replica.errors import BadRequest

MAX_DEPTH = 64

# A JSON string, escapes included: brackets inside one are text, not structure.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 opens, -1 (signed) closes


def nesting_depth(text: str) -> int:
    """How deep arrays and objects nest in JSON `text` (0 for a scalar), in C-speed passes.
    On text that is not JSON it may be off; the parser refuses such text anyway."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text)).encode("ascii")
    return max(accumulate(array("b", brackets.translate(_STEP))), default=0)


def too_deep() -> BadRequest:
    return BadRequest(f"body nests arrays and objects deeper than {MAX_DEPTH} levels: flatten it")


def parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        text = body.decode(json.detect_encoding(body), "surrogatepass")  # as json.loads would
    except UnicodeDecodeError as error:
        raise BadRequest(f"body is not valid JSON: {error}") from None
    # Nesting is at most the count of '[' and '{': most bodies have too few to need a scan.
    if text.count("[") + text.count("{") > MAX_DEPTH and nesting_depth(text) > MAX_DEPTH:
        raise too_deep()
    try:
        value = json.loads(text)
    except RecursionError:  # not reached past the check above; a 400 all the same
        raise too_deep() from None
    except ValueError as error:  # JSONDecodeError, and an integer over Python's 4,300 digits
        raise BadRequest(f"body is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise BadRequest(f"body must be a JSON object, got {type(value).__name__}")
    return value
