"""The replica's aiohttp app factory: lifecycle, error middleware, the `X-Replica-Load` header.

Models load in a background task after the socket opens, so `/ping` answers 503 while loading.
Every response carries `X-Replica-Load: queued=<n>,running=<n>,capacity=<n>,backlog_tokens=<n>,
inflight=<n>,kv_usage=<0-1>` (totals over the replica's models; `kv_usage` is the fullest
model's share of KV blocks in use) for the gateway's load feedback. `inflight`
counts the inference (POST) requests being handled, without the one answered, so a gateway can
tell its own requests from those other gateways sent. Routes live in `replica/routes/`; a
request with an `Idempotency-Key` passes replica/idempotency.py on its way to them. With
`tracing:`, replica/tracing.py's middleware comes first (and only then).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CollectorRegistry

from replica import idempotency
from replica.batching.clock import Clock
from replica.config import ReplicaConfig
from replica.errors import ReplicaError, error_body, kserve_error_body
from replica.keys import CONFIG, METRICS, STATE
from replica.metrics import ReplicaMetrics
from replica.request_body import encoding_middleware
from replica.routes import chat, health, kserve, openai, openapi, sagemaker
from replica.runtime import build_runtime
from replica.state import ReplicaState

log = logging.getLogger("replica")

LOAD_HEADER = "X-Replica-Load"
WORKING = web.RequestKey("working", bool)  # set while the request counts in state.working

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_error(
    request: web.Request,
    status: int,
    type_: str,
    message: str,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """`error_body`, or on /v2 `kserve_error_body` (see replica/errors.py)."""
    kserve = request.path.startswith("/v2/")
    body = kserve_error_body(type_, message) if kserve else error_body(type_, message)
    return web.json_response(body, status=status, headers=headers)


def _endpoint(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


async def _respond(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ReplicaError as error:
        return json_error(request, error.status, error.type, error.message, error.headers())
    except web.HTTPRequestEntityTooLarge as error:
        return json_error(
            request, 413, "payload_too_large", error.text or "request body is too large"
        )
    except web.HTTPException as error:
        message = f"{request.method} {request.path}: {error.reason}"
        return json_error(request, error.status, error.reason.lower().replace(" ", "_"), message)
    except ConnectionResetError:
        raise  # the client went away mid-response: nothing to answer, nothing to log
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return json_error(
            request, 500, "internal_error", "the replica failed to handle this request"
        )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[STATE]
    state.begin()
    working = request.method == "POST"
    if working:
        state.working += 1
        request[WORKING] = True
    try:
        response = await _respond(request, handler)
    finally:
        state.end()
        if working:
            state.working -= 1
            request[WORKING] = False
    status = f"{response.status // 100}xx"
    request.app[METRICS].requests.labels(_endpoint(request), status).inc()
    return response


async def _add_load_header(request: web.Request, response: web.StreamResponse) -> None:
    state = request.app[STATE]
    load = state.load()
    others = state.working - bool(request.get(WORKING))
    response.headers[LOAD_HEADER] = (
        f"queued={load.queued},running={load.running},capacity={load.capacity},"
        f"backlog_tokens={load.backlog_tokens},inflight={others},kv_usage={load.kv_usage:.3f}"
    )


async def _load_models(app: web.Application, clock: Clock | None) -> None:
    state = app[STATE]
    try:
        loop = asyncio.get_running_loop()
        runtime = await loop.run_in_executor(None, build_runtime, app[CONFIG], app[METRICS], clock)
    except Exception as error:
        log.exception("model loading failed")
        state.phase, state.load_error = "failed", str(error)
    else:
        state.runtime = runtime
        if state.phase == "loading":
            state.phase = "ready"
    finally:
        state.settled.set()


def _runtime_ctx(clock: Clock | None) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        loading = asyncio.create_task(_load_models(app, clock), name="load-models")
        yield
        if not loading.done():
            loading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loading
        state = app[STATE]
        state.phase = "draining"
        if state.runtime is not None:
            await state.runtime.close()

    return ctx


def create_app(
    config: ReplicaConfig,
    *,
    registry: CollectorRegistry | None = None,
    clock: Clock | None = None,
) -> web.Application:
    metrics = ReplicaMetrics(registry or CollectorRegistry())
    replays = idempotency.middleware(idempotency.AnswerCache(), metrics.idempotent_replays.inc)
    middlewares: list[Middleware] = [error_middleware, encoding_middleware, replays]
    lifetimes = [_runtime_ctx(clock)]
    if config.tracing is not None:  # the opentelemetry modules are imported here, and only here
        from replica.tracing import ReplicaTracer

        tracer = ReplicaTracer(config.tracing)
        middlewares.insert(0, tracer.middleware)
        lifetimes.insert(0, tracer.lifetime)  # its spans are sent after the rest has stopped
    app = web.Application(
        client_max_size=config.server.max_body_bytes,
        middlewares=middlewares,
        # Bodies are read as sent, never decoded (replica/request_body.py): also in test servers.
        handler_args={"auto_decompress": False},
    )
    app[CONFIG] = config
    app[STATE] = ReplicaState()
    app[METRICS] = metrics
    app.on_response_prepare.append(_add_load_header)
    app.cleanup_ctx.extend(lifetimes)
    for module in (health, openai, chat, kserve, sagemaker, openapi):
        app.router.add_routes(module.routes)
    return app
