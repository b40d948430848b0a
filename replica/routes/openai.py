"""OpenAI-compatible `POST /v1/completions`, and the generation path it shares with
`/v1/chat/completions` (replica/routes/chat.py): JSON or SSE (`data: {...}` chunks,
`data: [DONE]`).

Each prompt becomes one `GenRequest` submitted to the model's batcher; a stream starts only
after the first token, so queue errors (429/503) still get a proper status code. A stream that
fails after that ends with `event: error` + `data: {"error": {...}}` and no `[DONE]`. What
differs between the two APIs (ids, object names, how a choice and a chunk read) is a `Format`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from functools import partial
from typing import Any, Protocol

from aiohttp import web

from replica.api.body import parse_json_object
from replica.api.schemas import OpenAIRequest, parse_completion
from replica.batching import Batcher
from replica.errors import BadRequest, ReplicaError, error_body
from replica.generation import (
    Completion,
    FinishHook,
    GenRequest,
    SamplingParams,
    TokenEvent,
    TokenSink,
)
from replica.models.tokenizer import encode
from replica.request_body import read_body
from replica.routes.common import TRACE, state
from replica.runtime import GenerativeModel

log = logging.getLogger("replica")
routes = web.RouteTableDef()


class Format(Protocol):
    """How one OpenAI API writes its answers."""

    id_prefix: str  # "cmpl-", "chatcmpl-"
    object: str  # of a whole answer
    chunk_object: str  # of each SSE chunk

    def choice(self, index: int, completion: Completion) -> dict[str, Any]: ...

    def deltas(self, index: int, event: TokenEvent, first: bool) -> list[dict[str, Any]]:
        """The chunks' choices for one token event of prompt `index` (`first`: its first)."""
        ...


def build_request(
    model: GenerativeModel,
    req: OpenAIRequest,
    prompt: str,
    sink: TokenSink,
    on_finish: FinishHook | None = None,
) -> GenRequest:
    ids = encode(prompt)
    field, max_tokens = req.budget
    limit, context = model.config.max_tokens_limit, model.context_len
    if max_tokens > limit:
        raise BadRequest(f"{field}: {max_tokens} is over this model's limit of {limit}")
    if len(ids) + max_tokens > context:
        raise BadRequest(
            f"{req.input_field}: {len(ids)} tokens plus {field} {max_tokens} exceed the context "
            f"length {context}"
        )
    seed = req.seed if req.seed is not None else random.getrandbits(31)
    sampling = SamplingParams(req.temperature, req.top_p, seed)
    return GenRequest(ids, max_tokens, context, sampling, req.stops, sink, on_finish=on_finish)


async def submit_all(
    batcher: Batcher[GenRequest, Completion], requests: list[GenRequest]
) -> list[Completion]:
    """Submit every prompt; the first failure cancels the rest and is raised as itself."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(batcher.submit(r)) for r in requests]
    except* ReplicaError as errors:
        raise errors.exceptions[0] from None
    return [t.result() for t in tasks]


class _Merged:
    """Token events of several prompts, in production order, tagged with the prompt index; and
    with `keep_completions`, once the stream has ended, their Completions. Keeping them can end
    the stream later: a static or dynamic batch returns when its longest sequence finishes."""

    def __init__(self, *, keep_completions: bool = False) -> None:
        self._loop = asyncio.get_running_loop()
        self.keep_completions = keep_completions
        self.queue: asyncio.Queue[tuple[int, TokenEvent] | BaseException] = asyncio.Queue()
        self.tasks: list[asyncio.Task[Completion]] = []

    def sink(self, index: int) -> TokenSink:
        def put(event: TokenEvent) -> None:
            self._loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

        return put

    def on_done(self, task: asyncio.Task[Completion]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.queue.put_nowait(task.exception() or RuntimeError("unreachable"))

    def completions(self) -> list[Completion]:
        """After `stream_events` ran to its end: each prompt's Completion, in prompt order."""
        assert self.keep_completions, "completions were not kept"
        return [task.result() for task in self.tasks]


async def stream_events(
    batcher: Batcher[GenRequest, Completion], requests: list[GenRequest], merged: _Merged
) -> AsyncGenerator[tuple[int, TokenEvent]]:
    merged.tasks = [asyncio.create_task(batcher.submit(r)) for r in requests]
    for task in merged.tasks:
        task.add_done_callback(merged.on_done)
    try:
        remaining = len(merged.tasks)
        while remaining:
            item = await merged.queue.get()
            if isinstance(item, BaseException):
                raise item
            remaining -= item[1].finish_reason is not None
            yield item
        if merged.keep_completions:  # else the cancel below drops what is left of a batch
            await asyncio.wait(merged.tasks)
    finally:
        for task in merged.tasks:
            task.cancel()
        await asyncio.gather(*merged.tasks, return_exceptions=True)


def _envelope(
    object_: str, cid: str, created: int, model: str, choices: list[dict[str, Any]]
) -> dict[str, Any]:
    return {"id": cid, "object": object_, "created": created, "model": model, "choices": choices}


def _usage(completions: list[Completion]) -> dict[str, Any]:
    prompt_tokens = sum(c.prompt_tokens for c in completions)
    completion_tokens = sum(len(c.token_ids) for c in completions)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": sum(c.cached_tokens for c in completions)},
    }


def _sse(payload: dict[str, Any] | str, event: str | None = None) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    field = f"event: {event}\n" if event else ""
    return f"{field}data: {data}\n\n".encode()


class _SseResponse:
    """An SSE response whose headers go out at the first token, so that errors before it still
    get their own status code from the middleware."""

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self._response: web.StreamResponse | None = None

    @property
    def started(self) -> bool:
        return self._response is not None

    async def open(self) -> web.StreamResponse:
        if self._response is None:
            self._response = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
            )
            await self._response.prepare(self._request)
        return self._response

    async def send(self, payload: dict[str, Any] | str, event: str | None = None) -> None:
        await (await self.open()).write(_sse(payload, event))

    async def end(self) -> web.StreamResponse:
        response = await self.open()
        await response.write_eof()
        return response


Envelope = Callable[[list[dict[str, Any]]], dict[str, Any]]


async def generate(
    request: web.Request, req: OpenAIRequest, fmt: Format, arrival: float
) -> web.StreamResponse:
    """Run every prompt of a parsed completion or chat request; answer in `fmt`."""
    model = state(request).generative(req.model)
    trace = request.get(TRACE)
    finish = None if trace is None else trace.generation(model.name, model.config.batcher.kind)
    if req.stream:
        return await _stream(request, model, req, fmt, arrival, finish)
    gens = [build_request(model, req, p, _ignore, finish) for p in req.prompts]
    results = await submit_all(model.batcher, gens)
    for c in results:
        model.metrics.on_generation(c.first_token_at_s - arrival, c.tpot_s)
    choices = [fmt.choice(i, c) for i, c in enumerate(results)]
    cid = f"{fmt.id_prefix}{uuid.uuid4().hex}"
    payload = _envelope(fmt.object, cid, int(time.time()), model.name, choices)
    return web.json_response({**payload, "usage": _usage(results)})


async def _stream(
    request: web.Request,
    model: GenerativeModel,
    req: OpenAIRequest,
    fmt: Format,
    arrival: float,
    finish: FinishHook | None = None,
) -> web.StreamResponse:
    """Chunks as tokens come, the usage chunk if asked, then `[DONE]`. A failure after the
    headers went out ends the stream with an error event and no `[DONE]`: the answer is
    incomplete, and no client may take it for a whole one."""
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    merged = _Merged(keep_completions=include_usage)
    gens = [build_request(model, req, p, merged.sink(i), finish) for i, p in enumerate(req.prompts)]
    cid = f"{fmt.id_prefix}{uuid.uuid4().hex}"
    envelope = partial(_envelope, fmt.chunk_object, cid, int(time.time()), model.name)
    out = _SseResponse(request)
    try:
        await _relay(out, model, gens, merged, fmt, envelope, arrival)
        usage = _usage(merged.completions()) if include_usage else None
    except ConnectionResetError:
        raise  # the client went away: nobody is left to tell
    except Exception as error:
        if not out.started:
            raise  # nothing sent yet: the middleware answers with the error's status
        await out.send(_error_event(error), event="error")
        return await out.end()
    if usage is not None:
        await out.send({**envelope([]), "usage": usage})
    await out.send("[DONE]")
    return await out.end()


async def _relay(
    out: _SseResponse,
    model: GenerativeModel,
    gens: list[GenRequest],
    merged: _Merged,
    fmt: Format,
    envelope: Envelope,
    arrival: float,
) -> None:
    """Write each prompt's tokens as they are produced."""
    counts, first_at = [0] * len(gens), [0.0] * len(gens)
    async with aclosing(stream_events(model.batcher, gens, merged)) as events:
        async for index, event in events:
            await out.open()
            counts[index] += 1
            first_at[index] = first_at[index] or time.monotonic()
            for choice in fmt.deltas(index, event, first=counts[index] == 1):
                await out.send(envelope([choice]))
            if event.finish_reason:
                _observe(model, arrival, first_at[index], counts[index])


def _error_event(error: Exception) -> dict[str, dict[str, str]]:
    if isinstance(error, ReplicaError):
        return error_body(error.type, error.message)
    log.error("generation failed mid-stream", exc_info=error)
    return error_body(ReplicaError.type, "generation failed mid-stream; the answer is incomplete")


def _observe(model: GenerativeModel, arrival: float, first_at: float, count: int) -> None:
    now = time.monotonic()
    tpot = (now - first_at) / (count - 1) if count > 1 else None
    model.metrics.on_generation(first_at - arrival, tpot)


def _ignore(_event: TokenEvent) -> None:
    return None


class TextFormat:
    id_prefix, object, chunk_object = "cmpl-", "text_completion", "text_completion"

    def choice(self, index: int, completion: Completion) -> dict[str, Any]:
        return _text_choice(index, completion.text, completion.finish_reason)

    def deltas(self, index: int, event: TokenEvent, first: bool) -> list[dict[str, Any]]:
        if event.text or event.finish_reason:
            return [_text_choice(index, event.text, event.finish_reason)]
        return []


def _text_choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


TEXT = TextFormat()


async def complete(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    arrival = time.monotonic()
    return await generate(request, parse_completion(body), TEXT, arrival)


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    return await complete(request, parse_json_object(await read_body(request)))
