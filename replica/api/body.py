"""Client JSON bodies: every route that reads one (OpenAI, chat, tokenize, KServe v2, SageMaker)
parses it here, so one rule holds everywhere.

The rule: a body is one JSON object, in UTF-8 (or UTF-16/32, as Python's json detects), nested
at most `MAX_DEPTH` arrays and objects deep (gateway/boundedjson.py, which the job store reads
with too): a body nested 5,000 deep is a 400 naming the limit, not a `RecursionError` in the
parser, in pydantic or in `json.dumps` of a value we echo.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.boundedjson import MAX_DEPTH, TooDeep, load_json
from replica.errors import BadRequest

__all__ = ["MAX_DEPTH", "parse_json_object"]


def parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        text = body.decode(json.detect_encoding(body), "surrogatepass")  # as json.loads would
        value = load_json(text)
    except TooDeep:
        raise BadRequest(
            f"body nests arrays and objects deeper than {MAX_DEPTH} levels: flatten it"
        ) from None
    except ValueError as error:  # not UTF-8, JSONDecodeError, an integer over 4,300 digits
        raise BadRequest(f"body is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise BadRequest(f"body must be a JSON object, got {type(value).__name__}")
    return value
