"""What a request asks of a replica, for the policies that route by it (see Policy.needs).

Work is estimated in tokens: for an OpenAI completion or chat request, the prompt's tokens
(characters / 4, the usual rule of thumb for English with BPE tokenizers; a list of token ids
counts exactly) plus `max_tokens` (OpenAI's default 16 when absent). Any other request, or a
body that is not such JSON, counts as 1. The affinity key is a configured header's value, or
else the first `prompt_prefix_chars` characters of the prompt. Bodies are parsed only for a
policy that needs them, and never past a size cap, so routing never costs a large parse.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection
from typing import Any

from multidict import CIMultiDictProxy

from gateway.config import AffinityConfig
from gateway.routing.options import PrefixOptions
from gateway.routing.prefix import block_hashes, prompt_text
from gateway.routing.request import NO_INFO, Need, RequestInfo

CHARS_PER_TOKEN = 4
DEFAULT_MAX_TOKENS = 16  # OpenAI completions' default
PARSE_MAX_BYTES = 1024 * 1024
SSE_MAX_LINE = 64 * 1024  # of an event's data, and of a line held across chunks


def describe(
    needs: Collection[Need],
    headers: CIMultiDictProxy[str],
    body: bytes,
    affinity: AffinityConfig,
    prefix: PrefixOptions | None = None,
) -> RequestInfo:
    if not needs:
        return NO_INFO
    if "prefix" in needs:
        return _prefix_info(headers, body, prefix or PrefixOptions())
    key = headers.get(affinity.header) if "key" in needs and affinity.header else None
    payload = _json_object(body) if ("tokens" in needs or key is None) else None
    prompt = _prompt_text(payload) if payload is not None else None
    tokens = 1
    if "tokens" in needs and payload is not None and prompt is not None:
        tokens = _prompt_tokens(payload) + _max_tokens(payload)
    if key is None and "key" in needs and prompt and affinity.prompt_prefix_chars:
        key = prompt[: affinity.prompt_prefix_chars]
    return RequestInfo(tokens=tokens, key=key)


def _prefix_info(
    headers: CIMultiDictProxy[str], body: bytes, options: PrefixOptions
) -> RequestInfo:
    payload = _json_object(body)
    text = prompt_text(payload) if payload is not None else None
    session = headers.get(options.session_header) if options.session_header else None
    if text is None:
        return RequestInfo(tokens=1, key=session)
    hashes = block_hashes(text, options.block_size, options.prefix_length)
    length = len(text.encode("utf-8", errors="surrogatepass")) + 1  # BOS
    return RequestInfo(tokens=length, key=session, prefix=hashes, prompt_tokens=length)


class SseCounter:
    """A relayed event stream read by its framing, chunk by chunk as it passes (lines end in
    LF, CRLF or CR, split anywhere; a blank line ends an event). `feed` returns the `data:`
    lines in a chunk: one a token in an OpenAI stream, the final `[DONE]` included (the count
    only lowers an estimate that was an upper bound). `failed` turns true once an event is an
    error: it has `event: error`, or its data is a JSON object with a top-level "error" (OpenAI,
    vLLM, TGI) or `"object": "error"` (vLLM's older streams). What a model writes sits inside
    a data value, so no text it outputs can count as an event or fail the stream."""

    __slots__ = ("_data", "_error_event", "_partial", "_size", "_skip_lf", "_suspect", "failed")

    def __init__(self) -> None:
        self._partial = b""  # a line not yet ended, carried to the next chunk
        self._skip_lf = False  # the last chunk ended in CR: an LF opening this one ends that line
        self._error_event = False
        self._suspect = False  # a data line names "error": the event's data is parsed at its end
        self._data: list[bytes] = []
        self._size = 0
        self.failed = False

    def feed(self, chunk: bytes) -> int:
        if (  # the usual chunk: whole LF-ended events naming no error, after whole ones
            chunk[-2:] == b"\n\n"
            and not (self._partial or self._size or self._error_event)
            and b"\r" not in chunk
            and b"error" not in chunk
        ):
            self._skip_lf = False
            return chunk.count(b"\ndata:") + chunk.startswith(b"data:")
        if self._skip_lf and chunk[:1] == b"\n":
            chunk = chunk[1:]
        self._skip_lf = chunk[-1:] == b"\r"
        text = self._partial + chunk if self._partial else chunk
        lines = text.splitlines()
        self._partial = b""
        if lines and text[-1:] not in (b"\n", b"\r"):
            self._partial = lines.pop()[:SSE_MAX_LINE]  # enough to know the field
        count = 0
        for line in lines:
            if not line:
                self._dispatch()
            elif line.startswith(b"data:"):
                count += 1
                self._add_data(line[5:].removeprefix(b" "))
            elif line.startswith(b"event:"):
                self._error_event = line[6:].removeprefix(b" ") == b"error"
        return count

    def _add_data(self, value: bytes) -> None:
        self._size += len(value) + 1
        if self._size <= SSE_MAX_LINE:  # an error object is small; a larger event is none
            self._data.append(value)
            self._suspect = self._suspect or b'"error"' in value

    def _dispatch(self) -> None:
        if self._error_event or (self._suspect and _is_error_object(b"\n".join(self._data))):
            self.failed = True
        self._error_event = self._suspect = False
        self._data.clear()
        self._size = 0


def _is_error_object(data: bytes) -> bool:
    try:
        payload = json.loads(data)
    except (ValueError, RecursionError):
        return False
    if not isinstance(payload, dict):
        return False
    return payload.get("error") is not None or payload.get("object") == "error"


def _json_object(body: bytes) -> dict[str, Any] | None:
    if not body or len(body) > PARSE_MAX_BYTES or body.lstrip()[:1] != b"{":
        return None
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return None  # the replica will say what is wrong with it
    return payload if isinstance(payload, dict) else None


def _prompt_text(payload: dict[str, Any]) -> str | None:
    """The prompt as text (completions' `prompt`, or chat `messages` contents joined)."""
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return "".join(p for p in prompt if isinstance(p, str)) or json.dumps(prompt)[:4096]
    messages = payload.get("messages")
    if isinstance(messages, list):
        return "".join(
            m["content"]
            for m in messages
            if isinstance(m, dict) and isinstance(m.get("content"), str)
        )
    return None


def _prompt_tokens(payload: dict[str, Any]) -> int:
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return len(prompt)
    text = _prompt_text(payload) or ""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def _max_tokens(payload: dict[str, Any]) -> int:
    value = payload.get("max_tokens", payload.get("max_completion_tokens", DEFAULT_MAX_TOKENS))
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return DEFAULT_MAX_TOKENS
