"""JSON read under one depth rule, for every body a client or replica hands us whole: nesting
past `MAX_DEPTH` arrays and objects is refused, measured on the text before it is parsed, so a
body nested 5,000 deep is a clear error, never a `RecursionError` in the parser, in pydantic or
in `json.dumps` of what we keep. 64 leaves room for any real request (chat content parts sit 4
deep, a KServe tensor 4 or 5) and keeps every recursive walk short. The replica (api/body.py)
and the job store (jobs/requests.py) both read through it."""

from __future__ import annotations

import json
import re
from array import array
from itertools import accumulate
from typing import Any

MAX_DEPTH = 64

_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # brackets in one are text
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 opens, -1 (signed) closes


class TooDeep(ValueError):
    """The text nests arrays and objects deeper than the limit it was read with."""

    def __init__(self, max_depth: int) -> None:
        super().__init__(f"arrays and objects nest deeper than {max_depth} levels: flatten it")
        self.max_depth = max_depth


def nesting_depth(text: str) -> int:
    """How deep arrays and objects nest in JSON `text` (0 for a scalar), in C-speed passes;
    on text that is not JSON it may be off, and the parser refuses that text anyway."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text)).encode("ascii")
    return max(accumulate(array("b", brackets.translate(_STEP))), default=0)


def load_json(text: str, max_depth: int = MAX_DEPTH) -> Any:
    """`json.loads` under the depth rule: TooDeep past `max_depth`; JSONDecodeError, or a
    ValueError for an integer past Python's 4,300 digits, on text that is not JSON."""
    # Nesting is at most the count of '[' and '{': most texts have too few to need a scan.
    if text.count("[") + text.count("{") > max_depth and nesting_depth(text) > max_depth:
        raise TooDeep(max_depth)
    try:
        return json.loads(text)
    except RecursionError:  # not reached past the check above
        raise TooDeep(max_depth) from None
