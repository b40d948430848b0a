"""The tokens a response says it used: OpenAI's `usage` object (`prompt_tokens`,
`completion_tokens`), in a whole JSON body or in a stream's event (the last chunk of a stream
asked with `stream_options: {include_usage: true}`; vLLM and SGLang send it so). What settles a
key's token reservation and corrects its tenant's service (gateway/datapath/tenancy.py)."""

from __future__ import annotations

import re
from typing import Any

from gateway.flow.service import Usage


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


_COUNT = re.compile(rb'"(prompt_tokens|completion_tokens)"\s*:\s*(\d{1,15})\b')


def usage_of_body(body: bytes) -> Usage | None:
    """The usage of a whole JSON response body, if it names one: read from its last
    `"prompt_tokens": N` and `"completion_tokens": N` keys without parsing the body (OpenAI,
    vLLM, SGLang and TGI put `usage` last, and the text a model writes sits in JSON strings,
    where those quotes would be escaped). None when it has no usage."""
    at = body.rfind(b'"usage"')
    if at < 0:
        return None
    counts = {m[1]: int(m[2]) for m in _COUNT.finditer(body, at)}
    prompt = counts.get(b"prompt_tokens")
    if prompt is None:
        return None
    return Usage(prompt, counts.get(b"completion_tokens", 0))


def _count(*values: int) -> bool:
    return all(not isinstance(v, bool) and 0 <= v < 2**53 for v in values)
