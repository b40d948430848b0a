"""The tokens a response says it used: OpenAI's `usage` object (`prompt_tokens`,
`completion_tokens`), in a whole JSON body or in a stream's event (the last chunk of a stream
asked with `stream_options: {include_usage: true}`; vLLM and SGLang send it so). What settles a
key's token reservation and corrects its tenant's service (gateway/datapath/tenancy.py)."""

from __future__ import annotations

import json
from typing import Any

from gateway.flow.service import Usage

USAGE_MAX_BYTES = 256 * 1024  # a body larger than this is not parsed for its usage


def usage_in(payload: Any) -> Usage | None:
    """The usage of a parsed response (or stream chunk); None when it has none that counts."""
    if not isinstance(payload, dict):
        return None
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens", 0)
    if isinstance(prompt, int) and isinstance(completion, int) and _count(prompt, completion):
        return Usage(prompt, completion)
    return None


def usage_of_body(body: bytes) -> Usage | None:
    """The usage of a whole JSON response body, if it is one and names it."""
    if len(body) > USAGE_MAX_BYTES or b'"usage"' not in body:
        return None
    try:
        return usage_in(json.loads(body))
    except (ValueError, RecursionError):
        return None


def _count(*values: int) -> bool:
    return all(not isinstance(v, bool) and 0 <= v < 2**53 for v in values)
