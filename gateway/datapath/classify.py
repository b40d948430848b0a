"""Classify a request once: the model it asks for (and the body or path rewritten for an
alias: gateway/datapath/models.py), and what its policy `needs` to know of it, from one parse
of its body by one rule (`parse_body`).

Work is estimated in tokens: for an OpenAI completion or chat request, the prompt's tokens
(characters / 4, the usual rule of thumb for English with BPE tokenizers; a list of token ids
counts exactly) plus `max_tokens` (OpenAI's default 16 when absent). Any other request, or a
body that is not such JSON, counts as 1. The affinity key is a configured header's value, or
else the first `prompt_prefix_chars` characters of the prompt. A body is parsed only when the
model routing or the policy needs it, and never past PARSE_MAX_BYTES, so routing never costs
a large parse. The proxy, the jobs scheduler and the simulator (loadtests/) classify here.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from typing import Any

from multidict import CIMultiDictProxy

from gateway.datapath import models
from gateway.datapath.models import Payload
from gateway.pool.live import Live
from gateway.routing.options import AffinityOptions, PrefixOptions
from gateway.routing.prefix import chain
from gateway.routing.request import NO_INFO, Need, RequestInfo
from gateway.routing.tokens import BYTES, Head, PromptTokenizer

CHARS_PER_TOKEN = 4
DEFAULT_MAX_TOKENS = 16  # OpenAI completions' default
PARSE_MAX_BYTES = 8 * 1024 * 1024  # a larger body is routed unread (to any replica of the pool)
UTF8_BOM = b"\xef\xbb\xbf"


@dataclass(slots=True)  # made for every request: not frozen (that costs), never changed
class Classified:
    """A request as the gateway routes and sends it."""

    model: str | None  # the served model it asks for (after aliases); None: any replica
    asked: str | None  # the name the client sent (an alias, or the served name)
    body: bytes  # as it goes to the replica (the model rewritten for an alias)
    path_qs: str  # as it goes to the replica (a /v2/models/{alias}/... path rewritten)
    info: RequestInfo  # what its policy needs of it
    estimate: Estimate | None = None  # its tokens, where flow control or a limit asked


OFFLOAD_MIN_BYTES = 4096  # a longer body through a slow tokenizer is tokenized in a thread


@dataclass(frozen=True, slots=True)
class Estimate:
    """A completion or chat request's tokens before it runs: its prompt's (as for routing),
    and the `max_tokens` it asks for (None when it names none)."""

    prompt_tokens: int = 0
    max_tokens: int | None = None

    def total(self, default_max_tokens: int) -> int:
        return self.prompt_tokens + (
            self.max_tokens if self.max_tokens is not None else default_max_tokens
        )


NOT_GENERATIVE = Estimate()  # any other request: no tokens


def parse_body(body: bytes) -> Payload:
    """The body as a JSON object, or None: empty, over PARSE_MAX_BYTES, not an object, or not
    JSON (the replica will say what is wrong with it). A UTF-8 BOM and whitespace may lead."""
    if not body or len(body) > PARSE_MAX_BYTES:
        return None
    if body.lstrip().removeprefix(UTF8_BOM).lstrip()[:1] != b"{":
        return None
    try:
        payload = json.loads(body)  # bytes: a BOM is detected and skipped
    except (ValueError, RecursionError):
        return None
    return payload if isinstance(payload, dict) else None


async def classify_off_loop(
    live: Live, path_qs: str, headers: CIMultiDictProxy[str], body: bytes, estimate: bool = False
) -> Classified:
    """`classify`, with a slow tokenizer's work (a Hugging Face tokenizer: milliseconds on a
    long prompt) in a thread when the body is long, so the event loop keeps relaying others'
    streams meanwhile (the encoding runs in Rust without the GIL)."""
    tokenizer = live.runtime.options.tokenizer
    if not tokenizer.offload or len(body) < OFFLOAD_MIN_BYTES:
        return classify(live, path_qs, headers, body, estimate)
    later = _Later()
    asked = classify(live, path_qs, headers, body, estimate, later)
    if later.payload is None:  # its policy reads no prompt
        return asked
    options = live.runtime.options.prefix  # as classify read them, before a reload can come
    head = await asyncio.to_thread(tokenizer.head, later.payload, options.prefix_length)
    info = _prefix_of_ids(headers, head, options)
    return replace(asked, info=replace(info, model=asked.info.model))


class _Later:
    """Stands in for a slow tokenizer in `classify`: keeps the payload for a thread."""

    name = "later"
    offload = False
    payload: dict[str, Any] | None = None

    def ids(self, payload: dict[str, Any]) -> list[int] | None:
        self.payload = payload
        return None

    def head(self, payload: dict[str, Any], n: int) -> Head | None:
        self.payload = payload
        return None


def classify(
    live: Live,
    path_qs: str,
    headers: CIMultiDictProxy[str],
    body: bytes,
    estimate: bool = False,
    tokenizer: PromptTokenizer | None = None,
) -> Classified:
    """The request's model (ModelNotFound 404 or NoHealthyReplica 503 when no replica can take
    it), what its policy needs and, with `estimate`, its tokens, from at most one parse of the
    body."""
    runtime = live.runtime
    parsed: list[Payload] = []

    def payload() -> Payload:
        if not parsed:
            parsed.append(parse_body(body))
        return parsed[0]

    target = models.route(live, path_qs, body, payload)
    needs = runtime.policy_for(target.model).needs
    info = NO_INFO
    if needs:
        affinity, prefix = runtime.config.routing.affinity, runtime.options.prefix
        tokenizer = tokenizer or runtime.options.tokenizer
        info = request_info(needs, headers, payload, affinity, prefix, tokenizer)
    if target.model is not None:
        info = replace(info, model=target.model)
    tokens = estimate_tokens(payload()) if estimate else None
    path = target.path_qs or path_qs
    return Classified(target.model, target.asked, target.body, path, info, tokens)


def estimate_tokens(payload: Payload) -> Estimate:
    """A completion's or chat's tokens before it runs; NOT_GENERATIVE for any other body."""
    if payload is None or _prompt_text(payload) is None:
        return NOT_GENERATIVE
    value = payload.get("max_tokens", payload.get("max_completion_tokens"))
    asked = value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
    return Estimate(_prompt_tokens(payload), asked)


def describe(
    needs: Collection[Need],
    headers: CIMultiDictProxy[str],
    body: bytes,
    affinity: AffinityOptions,
    prefix: PrefixOptions | None = None,
) -> RequestInfo:
    """What a policy that `needs` these may know of a request with this body and headers, with
    no model routing (the simulator's gateway)."""
    if not needs:
        return NO_INFO
    return request_info(needs, headers, lambda: parse_body(body), affinity, prefix)


def request_info(
    needs: Collection[Need],
    headers: CIMultiDictProxy[str],
    payload: Callable[[], Payload],
    affinity: AffinityOptions,
    prefix: PrefixOptions | None = None,
    tokenizer: PromptTokenizer = BYTES,
) -> RequestInfo:
    """`payload`: the parsed body, asked for only when the needs call for it."""
    if "prefix" in needs:
        return _prefix_info(headers, payload(), prefix or PrefixOptions(), tokenizer)
    key = headers.get(affinity.header) if "key" in needs and affinity.header else None
    body = payload() if ("tokens" in needs or key is None) else None
    prompt = _prompt_text(body) if body is not None else None
    tokens = 1
    if "tokens" in needs and body is not None and prompt is not None:
        tokens = _prompt_tokens(body) + _max_tokens(body)
    if key is None and "key" in needs and prompt and affinity.prompt_prefix_chars:
        key = prompt[: affinity.prompt_prefix_chars]
    return RequestInfo(tokens=tokens, key=key)


def _prefix_info(
    headers: CIMultiDictProxy[str],
    payload: Payload,
    options: PrefixOptions,
    tokenizer: PromptTokenizer,
) -> RequestInfo:
    head = tokenizer.head(payload, options.prefix_length) if payload is not None else None
    return _prefix_of_ids(headers, head, options)


def _prefix_of_ids(
    headers: CIMultiDictProxy[str], head: Head | None, options: PrefixOptions
) -> RequestInfo:
    """`head`: the prompt's first `prefix_length` token ids and how many it has in all."""
    session = headers.get(options.session_header) if options.session_header else None
    if head is None or not head[1]:
        return RequestInfo(tokens=1, key=session)
    first, length = head
    hashes = tuple(chain(first[: options.prefix_length], options.block_size))
    return RequestInfo(tokens=length, key=session, prefix=hashes, prompt_tokens=length)


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
