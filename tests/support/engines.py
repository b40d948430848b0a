"""Upstream servers that speak other engines' documented HTTP surface: the true edge of our
system (vLLM, SGLang and TGI cannot run here). Each serves OpenAI's `GET /v1/models`, the
engine's health path and its Prometheus `/metrics` exposition with the load a test sets, and
answers every other request with what it received.

Metric names and labels are the engines' own:
- vLLM: `vllm:num_requests_running`, `vllm:num_requests_waiting` (gauges),
  `vllm:kv_cache_usage_perc`, each with `model_name`; LoRA adapters listed in /v1/models with
  `parent` (vLLM's `--lora-modules`).
- SGLang: `sglang:num_running_reqs`, `sglang:num_queue_reqs`, `sglang:token_usage`, with
  `model_name`.
- TGI: `tgi_queue_size`, `tgi_batch_current_size`, no labels.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.support.servers import serve

GAUGES = {
    "vllm": ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc"),
    "sglang": ("sglang:num_queue_reqs", "sglang:num_running_reqs", "sglang:token_usage"),
    "tgi": ("tgi_queue_size", "tgi_batch_current_size", None),
}


@dataclass
class FakeEngine:
    name: str
    engine: str = "vllm"  # vllm | sglang | tgi
    models: list[str] = field(default_factory=lambda: ["m"])
    adapters: dict[str, str] = field(default_factory=dict)  # LoRA name -> base model
    waiting: int = 0
    running: int = 0
    kv_usage: float = 0.0
    metrics_status: int = 200
    healthy: bool = True
    url: str = ""
    seen: list[dict[str, Any]] = field(default_factory=list)

    def exposition(self) -> str:
        waiting, running, kv = GAUGES[self.engine]
        lines = []
        labels = f'{{model_name="{self.models[0]}"}}' if self.engine != "tgi" else ""
        for metric, value in (
            (waiting, self.waiting),
            (running, self.running),
            (kv, self.kv_usage),
        ):
            if metric is None:
                continue
            lines += [f"# HELP {metric} as the engine documents it", f"# TYPE {metric} gauge"]
            lines.append(f"{metric}{labels} {float(value)}")
        # Other series an engine exposes, which must not confuse the reader.
        lines += [
            "# HELP process_cpu_seconds_total CPU time.",
            "# TYPE process_cpu_seconds_total counter",
            "process_cpu_seconds_total 12.5",
        ]
        return "\n".join(lines) + "\n"


def engine_app(engine: FakeEngine) -> web.Application:
    async def models(request: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "created": 1, "owned_by": engine.engine}
                for m in engine.models]  # fmt: skip
        data += [{"id": a, "object": "model", "created": 1, "owned_by": engine.engine,
                  "parent": base} for a, base in engine.adapters.items()]  # fmt: skip
        return web.json_response({"object": "list", "data": data})

    async def metrics(request: web.Request) -> web.Response:
        if engine.metrics_status != 200:
            return web.Response(status=engine.metrics_status, text="metrics broken")
        return web.Response(text=engine.exposition(), content_type="text/plain")

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=200 if engine.healthy else 503)

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        record = {"method": request.method, "path": request.raw_path, "body": body.decode()}
        engine.seen.append(record)
        return web.json_response({"engine": engine.name, **record})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health", health)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


@asynccontextmanager
async def fake_engines(*engines: FakeEngine) -> AsyncIterator[list[FakeEngine]]:
    async with AsyncExitStack() as stack:
        for engine in engines:
            engine.url = await stack.enter_async_context(serve(engine_app(engine)))
        yield list(engines)
