"""An OpenAI-style completions replica for tests on loopback, written inline with aiohttp: its
usage is the prompt's words and max_tokens (or the body's `completion_tokens` when given), it
streams one chunk a token (and a usage chunk when asked), `gate` holds requests until set, and
`order` records the prompts in the order they were served."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web


class Replica:
    """A replica speaking OpenAI completions: its usage is the prompt's words and max_tokens
    (or `completion_tokens` when asked); `gate` holds requests until set; `order` records the
    prompts in the order they were served."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.order: list[str] = []

    def app(self) -> web.Application:
        async def completions(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            await self.gate.wait()
            self.order.append(body["prompt"])
            prompt = len(body["prompt"].split())
            completion = body.get("completion_tokens", body.get("max_tokens", 16))
            usage = {"prompt_tokens": prompt, "completion_tokens": completion}
            if not body.get("stream"):
                choice = {"index": 0, "text": "x" * completion, "finish_reason": "length"}
                return web.json_response(
                    {
                        "id": "c",
                        "object": "text_completion",
                        "created": 0,
                        "model": "m",
                        "choices": [choice],
                        "usage": usage,
                    }
                )
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for _ in range(completion):
                chunk = {"choices": [{"index": 0, "text": "x"}], "usage": None}
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            if body.get("stream_options", {}).get("include_usage"):
                await response.write(
                    f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode()
                )
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response

        async def ping(request: web.Request) -> web.Response:
            return web.json_response({"ok": True})

        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        app.router.add_get("/ping", ping)
        return app

    @property
    def served(self) -> int:
        return len(self.order)
