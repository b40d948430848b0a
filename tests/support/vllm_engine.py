"""A fake vLLM engine on loopback: its OpenAI HTTP API (completions and chat, GET /v1/models,
GET /health) and its KV cache events (tests/support/vllm_events.py), over a prefix cache of
full blocks of the prompt's token ids as vLLM computes them (tests/support/tokenizer_files.py:
a real Hugging Face tokenizer and chat template). Each request stores the blocks of its prompt
the cache lacks (one BlockStored, chained to the longest cached prefix) and answers how many
prompt tokens were cached, as vLLM's usage does; `evict` and `restart` change the cache the
way an engine does. It never imports the gateway."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.support.servers import serve
from tests.support.tokenizer_files import chat_ids, completion_ids
from tests.support.vllm_events import FakePublisher, Hash

BLOCK = 16


@dataclass
class FakeVllm:
    name: str
    tokenizer: Path
    publisher: FakePublisher
    url: str = ""
    model: str = "fake-model"
    cache: dict[tuple[int, ...], Hash] = field(default_factory=dict)  # a prefix -> its block
    served: list[int] = field(default_factory=list)  # cached prompt tokens of each request

    async def prompt(self, ids: list[int]) -> int:
        """Run a prompt through the cache: store the blocks it lacks; the tokens it had."""
        blocks = len(ids) // BLOCK
        parent: Hash | None = None
        hit = 0
        while hit < blocks and tuple(ids[: (hit + 1) * BLOCK]) in self.cache:
            parent = self.cache[tuple(ids[: (hit + 1) * BLOCK])]
            hit += 1
        if hit < blocks:
            new = ids[hit * BLOCK : blocks * BLOCK]
            made = self.publisher.stored(new, BLOCK, parent=parent)
            for i, engine_hash in enumerate(made, start=hit + 1):
                self.cache[tuple(ids[: i * BLOCK])] = engine_hash
            await self.publisher.flush()
        self.served.append(hit * BLOCK)
        return hit * BLOCK

    async def evict(self) -> None:
        """Every cached block evicted (one BlockRemoved), as memory pressure would."""
        if self.cache:
            self.publisher.removed(list(self.cache.values()))
            self.cache.clear()
            await self.publisher.flush()

    def app(self) -> web.Application:
        async def chat(request: web.Request) -> web.Response:
            body = await request.json()
            cached = await self.prompt(chat_ids(self.tokenizer, body["messages"]))
            message = {"role": "assistant", "content": self.name}
            return self._reply(body, "chat.completion", {"message": message}, cached)

        async def completions(request: web.Request) -> web.Response:
            body = await request.json()
            cached = await self.prompt(completion_ids(self.tokenizer, body["prompt"]))
            return self._reply(body, "text_completion", {"text": self.name}, cached)

        async def models(request: web.Request) -> web.Response:
            return web.json_response({"object": "list", "data": [{"id": self.model}]})

        async def health(request: web.Request) -> web.Response:
            return web.Response()

        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        app.router.add_post("/v1/completions", completions)
        app.router.add_get("/v1/models", models)
        app.router.add_get("/health", health)
        return app

    def _reply(
        self, body: dict[str, Any], kind: str, choice: dict[str, Any], cached: int
    ) -> web.Response:
        usage = {
            "prompt_tokens": 0,
            "completion_tokens": 1,
            "prompt_tokens_details": {"cached_tokens": cached},
        }
        return web.json_response(
            {
                "id": f"cmpl-{uuid.uuid4().hex}",
                "object": kind,
                "model": body.get("model", self.model),
                "choices": [{"index": 0, "finish_reason": "length", **choice}],
                "usage": usage,
            }
        )


@asynccontextmanager
async def fake_vllm_engines(
    n: int, tokenizer: Path, **publisher: Any
) -> AsyncIterator[list[FakeVllm]]:
    """`n` fake engines with their own publishers (FakePublisher's options), all serving."""
    async with AsyncExitStack() as stack:
        engines = []
        for i in range(n):
            events = await stack.enter_async_context(FakePublisher(**publisher))
            engine = FakeVllm(f"vllm-{i}", tokenizer, events)
            engine.url = await stack.enter_async_context(serve(engine.app()))
            engines.append(engine)
        yield engines
