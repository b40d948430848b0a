"""Operational routes: SageMaker `/ping`, vLLM/SGLang-style `/health`, KServe health, `/load`,
`/metrics`, `/v1/models`, `/cache/blocks`."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from replica.batching import ContinuousBatcher
from replica.errors import BadRequest, NotReady
from replica.keys import METRICS
from replica.kv import HASH_SCHEME
from replica.models.tokenizer import DESCRIPTION as TOKENIZER
from replica.routes.common import state
from replica.runtime import GenerativeModel, ServedModel

routes = web.RouteTableDef()
_STARTED = int(time.time())


def _readiness(request: web.Request) -> web.Response:
    current = state(request)
    if not current.ready:
        raise NotReady(f"replica is {current.phase}")  # the middleware words it per route
    return web.json_response({"status": "ready"})


@routes.get("/ping")
async def ping(request: web.Request) -> web.Response:
    return _readiness(request)


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    """The readiness probe vLLM and SGLang servers answer, which their routers call on start."""
    return _readiness(request)


@routes.get("/v2/health/ready")
async def v2_ready(request: web.Request) -> web.Response:
    return _readiness(request)


@routes.get("/v2/health/live")
async def v2_live(request: web.Request) -> web.Response:
    return web.json_response({"live": True})


@routes.get("/v2")
async def v2_server(request: web.Request) -> web.Response:
    return web.json_response(
        {"name": "infergate-replica", "version": "0.1.0", "extensions": ["binary_tensor_data"]}
    )


@routes.get("/load")
async def load(request: web.Request) -> web.Response:
    current = state(request)
    total = current.load()
    per_model: dict[str, Any] = {}
    queried = hits = 0
    if current.runtime is not None:
        for name, model in current.runtime.models.items():
            if isinstance(model.batcher, ContinuousBatcher):
                stats = model.batcher.blocks.stats()
                queried, hits = queried + stats.queried_tokens, hits + stats.hit_tokens
            m = model.batcher.load()
            per_model[name] = {
                "queued": m.queued,
                "running": m.running,
                "capacity": m.capacity,
                "backlog_tokens": m.backlog_tokens,
                "kv_usage": round(m.kv_usage, 4),
            }
    return web.json_response(
        {
            "phase": current.phase,
            "queued": total.queued,
            "running": total.running,
            "capacity": total.capacity,
            "backlog_tokens": total.backlog_tokens,
            "kv_usage": round(total.kv_usage, 4),
            "inflight": current.working,  # inference requests being handled
            "prefix_cache_queried_tokens": queried,  # since start, over the models
            "prefix_cache_hit_tokens": hits,
            "models": per_model,
        }
    )


@routes.get("/cache/blocks")
async def cache_blocks(request: web.Request) -> web.Response:
    """The hashes of the KV blocks a model holds in its prefix cache (see replica/kv.py), so a
    router can compute a prompt's exact cached prefix here. At most one entry per KV block
    (`blocks`: hex; the same hashes go out as ints in KV cache events, unless they are sent
    as vLLM's with `kv_events.hashes: vllm`)."""
    model = state(request).generative(request.query.get("model"))
    batcher = model.batcher
    if not isinstance(batcher, ContinuousBatcher):
        raise BadRequest(
            f"model: '{model.name}' has no prefix cache (batcher {model.config.batcher.kind}); "
            "only the continuous batcher keeps one"
        )
    blocks = batcher.blocks
    events = model.kv_events
    return web.json_response(
        {
            "model": model.name,
            "enabled": blocks.prefix_cache,
            "block_size": blocks.block_size,
            "num_blocks": blocks.num_blocks,
            "hash_scheme": HASH_SCHEME,
            "tokenizer": TOKENIZER,
            "blocks": [f"{h:016x}" for h in batcher.cached_hashes()],
            # Where this model's KV cache events are published (replica/kv_events.py); null
            # when they are off or the PUB socket connects out rather than binds.
            "kv_events": events.endpoint_bound if events else None,
            "kv_events_replay": events.replay_bound if events else None,
        }
    )


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@routes.get("/v1/models")
async def v1_models(request: web.Request) -> web.Response:
    runtime = state(request).require_runtime()
    data = [_model_entry(name, model) for name, model in runtime.models.items()]
    return web.json_response({"object": "list", "data": data})


def _model_entry(name: str, model: ServedModel) -> dict[str, Any]:
    """OpenAI's model object, plus what a load generator sizes requests by: vLLM's
    `max_model_len` (the context: prompt and output tokens together) and `max_tokens_limit`."""
    entry: dict[str, Any] = {
        "id": name,
        "object": "model",
        "created": _STARTED,
        "owned_by": "infergate",
        "kind": "generative" if isinstance(model, GenerativeModel) else "classifier",
    }
    if isinstance(model, GenerativeModel):
        entry["max_model_len"] = model.context_len
        entry["max_tokens_limit"] = model.config.max_tokens_limit
    return entry
