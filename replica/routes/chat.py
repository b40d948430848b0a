"""OpenAI-compatible `POST /v1/chat/completions`: the completions path of replica/routes/openai.py
with chat's format.

The `messages` become one prompt through the chat template (replica/models/chat_template.py).
An answer is `{"message": {"role": "assistant", "content"}}`; a stream sends, per prompt,
a `{"role": "assistant", "content": ""}` delta at the first token, `{"content"}` deltas as text
comes, then an empty delta with the finish reason.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from replica.api.body import parse_json_object
from replica.api.schemas import parse_chat_completion, parse_completion
from replica.generation import Completion, TokenEvent
from replica.models.tokenizer import encode
from replica.request_body import read_body
from replica.routes.common import state
from replica.routes.openai import generate

routes = web.RouteTableDef()


class ChatFormat:
    id_prefix, object, chunk_object = "chatcmpl-", "chat.completion", "chat.completion.chunk"

    def choice(self, index: int, completion: Completion) -> dict[str, Any]:
        message = {"role": "assistant", "content": completion.text}
        return {
            "index": index,
            "message": message,
            "logprobs": None,
            "finish_reason": completion.finish_reason,
        }

    def deltas(self, index: int, event: TokenEvent, first: bool) -> list[dict[str, Any]]:
        out = [_delta(index, {"role": "assistant", "content": ""})] if first else []
        if event.text:
            out.append(_delta(index, {"content": event.text}))
        if event.finish_reason:
            out.append(_delta(index, {}, event.finish_reason))
        return out


def _delta(index: int, delta: dict[str, str], finish_reason: str | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


CHAT = ChatFormat()


async def chat(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    arrival = time.monotonic()
    return await generate(request, parse_chat_completion(body), CHAT, arrival)


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await chat(request, parse_json_object(await read_body(request)))


@routes.post("/tokenize")
async def tokenize(request: web.Request) -> web.Response:
    """vLLM's `POST /tokenize`: a completion body (`prompt`) or a chat body (`messages`, through
    the template) as the model's token ids, so a router matching token prefixes (vllm-router's
    cache_aware) sees what this replica caches. Nothing is generated."""
    body = parse_json_object(await read_body(request))
    parsed = parse_chat_completion(body) if "messages" in body else parse_completion(body)
    model = state(request).generative(parsed.model)
    tokens = list(encode(parsed.prompts[0]))
    return web.json_response(
        {"tokens": tokens, "count": len(tokens), "max_model_len": model.context_len}
    )
