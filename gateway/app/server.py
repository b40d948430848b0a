"""The gateway's HTTP surface: an app factory, its own endpoints, and the error middleware.

Paths the gateway owns (/healthz, /readyz, /metrics, /openapi.json, /admin and /admin/..., /ui
and /ui/...) answer here and are never proxied; every other method and path goes to proxy.handle.
Admin endpoints need `Authorization: Bearer <token>` matching INFERGATE_ADMIN_TOKEN and answer 404
when no token is configured. Proxied and jobs requests need an API key when `auth` is configured
(gateway/datapath/auth.py); the gateway's own endpoints keep their own rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import posixpath
import re
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import HttpVersion11, hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from gateway.app.reload import ReloadWatcher, reload_config_off_loop
from gateway.app.state import APP, AppState
from gateway.app.workers import Worker
from gateway.config import GatewayConfig
from gateway.control.cache_blocks import CacheBlocksProbe
from gateway.control.discovery import DnsDiscovery
from gateway.control.fetch import SESSION, session_fetch
from gateway.control.health import HealthChecker
from gateway.control.load import LoadProbe
from gateway.control.models import ModelsProbe
from gateway.control.probe import ProbeLoop
from gateway.datapath import proxy
from gateway.datapath.auth import as_sent, authenticate, bearer_token, require_key
from gateway.datapath.h1client import UpstreamPool
from gateway.datapath.proxy import PROXY, UPSTREAM, Proxy
from gateway.datapath.transport import Upstream
from gateway.errors import BodyTooLarge, ConfigError, GatewayError, error_body
from gateway.jobs import forward as jobs_forward
from gateway.jobs import routes as job_routes
from gateway.jobs.service import JOBS, JobService
from gateway.ops import models, status
from gateway.ops.metrics import METRICS, GatewayMetrics
from gateway.ops.openapi import DOCUMENT
from gateway.pool.live import LIVE, Live, build_runtime
from gateway.pool.replicas import ReplicaPool

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
WATCHER = web.AppKey("reload_watcher", ReloadWatcher)
HEALTH = web.AppKey("health_checker", HealthChecker)
_BODY_HEADERS = frozenset({"content-type", "content-length"})


def error_response(
    status: int, error_type: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(error_body(error_type, message), status=status, headers=headers)


def refusal(exc: GatewayError | web.HTTPException) -> web.Response:
    """The JSON answer to an error a check or handler raised."""
    if isinstance(exc, GatewayError):
        return error_response(exc.status, exc.error_type, str(exc), exc.headers)
    kind = exc.reason.lower().replace(" ", "_")
    # Its own headers (WWW-Authenticate, Allow) stay; the body becomes our JSON.
    kept = {k: v for k, v in exc.headers.items() if k.lower() not in _BODY_HEADERS}
    return error_response(exc.status, kind, exc.text or exc.reason, kept)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as exc:
        return refusal(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return refusal(exc)
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal_error", "the gateway failed; see its log")


Check = Callable[[web.Request], object]  # raises a GatewayError or HTTPException to refuse
ExpectHandler = Callable[[web.Request], Awaitable[web.StreamResponse | None]]


def _expecting(*checks: Check) -> ExpectHandler:
    """A route's answer to `Expect: 100-continue`: a request its headers alone refuse (`checks`:
    the API key, the admin token, the Content-Length) gets that refusal instead of `100
    Continue`, and its connection is closed, as the body the client holds back is never read
    (RFC 9110 10.1.1); an Expect other than 100-continue is a 417. aiohttp runs this before
    the middleware and the handler, which make the same checks again for requests without it."""

    async def expect(request: web.Request) -> web.StreamResponse | None:
        if request.version < HttpVersion11:
            return None  # HTTP/1.0 clients do not wait for a 100 (RFC 9110: ignore Expect)
        value = request.headers.get(hdrs.EXPECT, "")
        try:
            if value.strip().lower() != "100-continue":
                raise web.HTTPExpectationFailed(
                    text=f"Expect: {value[:40]!r} is not supported; send 100-continue or none"
                )
            for check in checks:
                check(request)
        except (GatewayError, web.HTTPException) as exc:
            response = refusal(exc)
            response.force_close()
            return response
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the final response's size starts after the 100
        return None

    return expect


def _body_fits(request: web.Request) -> None:
    """A declared Content-Length within the limit its handler reads the body with."""
    config = request.app[LIVE].runtime.config
    limit, name = config.limits.max_body_bytes, "limits.max_body_bytes"
    if request.path == "/v1/batches" and config.jobs is not None:
        limit, name = config.jobs.max_batch_bytes, "jobs.max_batch_bytes"
    if (request.content_length or 0) > limit:
        raise BodyTooLarge(f"request body over {name} = {limit} bytes")


def _proxied_checks(request: web.Request) -> None:
    if is_admin_path(request.path):  # the catch-all's spellings of /admin (see _proxied)
        _require_admin(request)
    else:
        authenticate(request)
        _body_fits(request)


def _only(methods: tuple[str, ...], handler: Handler) -> Handler:
    """Gateway-owned paths answer 405 to other methods instead of being proxied."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        if request.method not in methods:
            allowed = " or ".join(methods)
            raise web.HTTPMethodNotAllowed(
                request.method,
                methods,
                text=f"{request.path} answers {allowed}, not {request.method}",
            )
        return await handler(request)

    return guarded


def _require_admin(request: web.Request) -> AppState:
    state = request.app[APP]
    if state.admin_token is None:
        raise web.HTTPNotFound(text=f"{request.path} is off: set INFERGATE_ADMIN_TOKEN to enable")
    token = bearer_token(request.headers.get("Authorization"))
    if token is None or not hmac.compare_digest(token, as_sent(state.admin_token)):
        raise web.HTTPUnauthorized(
            text="admin endpoints need 'Authorization: Bearer <INFERGATE_ADMIN_TOKEN>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return state


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    live = request.app[LIVE]
    healthy = len(live.pool.available())
    ready = healthy > 0 and not live.draining and live.models_polled
    body = {
        "ready": ready, "healthy_replicas": healthy, "draining": live.draining,
        "models_known": live.models_polled,
    }  # fmt: skip
    return web.json_response(body, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].exposition)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _describe_state(state: AppState) -> dict[str, Any]:
    live = state.live
    return {
        "strategy": live.runtime.config.routing.strategy,
        "replicas": [status.replica_json(replica) for replica in live.pool.all()],
    }


async def admin_replicas(request: web.Request) -> web.Response:
    return web.json_response(_describe_state(_require_admin(request)))


async def admin_reload(request: web.Request) -> web.Response:
    state = _require_admin(request)
    await reload_config_off_loop(state, "admin")
    if state.live.worker is not None:  # the sibling workers reload too: the supervisor tells them
        os.kill(os.getppid(), signal.SIGHUP)
    return web.json_response({"result": "ok", **_describe_state(state)})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(DOCUMENT)


async def admin_unknown(request: web.Request) -> web.Response:
    _require_admin(request)
    raise web.HTTPNotFound(text=f"no admin endpoint {request.path}")


def is_admin_path(path: str) -> bool:
    """`/admin` or below it, however spelled (`//admin`, `/x/../admin`, `/admin%2F` decoded)."""
    if "/admin" not in path:
        return False  # the common case, at the cost of one substring search
    normal = posixpath.normpath(re.sub("/+", "/", path))
    return normal == "/admin" or normal.startswith("/admin/")


def _models_or_proxied(handler: Handler) -> Handler:
    """The gateway's model list while it knows models; a replica's own answer otherwise."""
    guarded = _only(("GET", "HEAD"), handler)

    async def route(request: web.Request) -> web.StreamResponse:
        if models.known(request.app[LIVE]):
            return await guarded(request)
        return await proxy.handle(request)

    return route


def _proxied(handler: Handler) -> Handler:
    """The catch-all route: a spelling of an admin path the router did not match stays here."""

    async def route(request: web.Request) -> web.StreamResponse:
        if is_admin_path(request.path):
            return await admin_unknown(request)
        return await handler(request)

    return route


async def _start_draining(app: web.Application) -> None:
    app[LIVE].draining = True


async def _client_session(app: web.Application) -> AsyncIterator[None]:
    # Idle connections to replicas closed before the replica closes them (as the proxy's own
    # pool does): the value at start-up, for health checks, pollers and the jobs scheduler.
    keepalive_s = app[LIVE].runtime.config.timeouts.upstream_keepalive_s
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=keepalive_s, ttl_dns_cache=10)
    session = aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept"),
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None),
    )
    app[SESSION] = session
    pool = None if UPSTREAM in app else UpstreamPool()
    if pool is not None:
        app[UPSTREAM] = pool
    yield
    if pool is not None:
        pool.close()
    await session.close()


Background = Callable[[], Coroutine[None, None, None]]


def _background(name: str, make: Background) -> Callable[[web.Application], AsyncIterator[None]]:
    """A task for the app's lifetime; one that fails is logged and started again."""

    async def keep_running(app: web.Application) -> None:
        while True:
            try:
                await make()
                return
            except Exception:
                log.exception("background task %s failed; starting it again", name)
                await asyncio.sleep(1.0)

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(keep_running(app), name=name)
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return ctx


def create_app(
    config: GatewayConfig,
    *,
    config_path: Path | None = None,
    admin_token: str | None = None,
    registry: CollectorRegistry | None = None,
    worker: Worker | None = None,
    upstream: Upstream | None = None,
) -> web.Application:
    """The gateway app; `worker`: this process is one of `workers: N` (gateway/app/workers.py);
    `upstream`: the proxy's upstream client (by default an h1client.UpstreamPool opened with the
    app; a test may hand it datapath/mock.MockUpstream)."""
    shared = worker.counts if worker is not None else None
    live = Live.start(build_runtime(config), ReplicaPool(config.replica_urls, shared=shared))
    if worker is not None:
        live.worker = (worker.index, worker.count)
    multiprocess_dir = worker.metrics_dir if worker is not None else None
    gateway_metrics = GatewayMetrics(
        registry or CollectorRegistry(), live.pool, live.admission, multiprocess_dir
    )
    gateway_metrics.watch(live)
    live.swap(live.runtime)
    state = AppState(config_path, live, gateway_metrics, admin_token)
    # The body limit follows the live config (proxy.read_body); aiohttp's own cap stays off.
    # A body is relayed as the client sent it, Content-Encoding and all (the replica decides
    # what it takes): aiohttp does not decompress it, so a body that does not decompress is
    # never the gateway's error.
    app = web.Application(
        middlewares=[error_middleware],
        client_max_size=0,
        handler_args={"auto_decompress": False},
    )
    app[APP] = state
    app[LIVE] = live
    app[METRICS] = gateway_metrics
    if upstream is not None:
        app[UPSTREAM] = upstream
    app[PROXY] = Proxy(live, lambda: app[UPSTREAM], gateway_metrics)
    app[WATCHER] = ReloadWatcher(state)

    def session() -> aiohttp.ClientSession:
        return app[SESSION]  # opened by _client_session

    app[HEALTH] = health = HealthChecker(live)
    app.on_shutdown.append(_start_draining)
    app.cleanup_ctx.append(_client_session)
    app.cleanup_ctx.append(_background("config-watch", app[WATCHER].run))
    fetch = session_fetch(session)
    loops: list[tuple[str, Callable[[], Coroutine[None, None, None]]]] = [
        ("health-checks", ProbeLoop(health, live, fetch).run),
        ("load-feedback", ProbeLoop(LoadProbe(live), live, fetch).run),
        ("served-models", ProbeLoop(ModelsProbe(live), live, fetch).run),
        ("cache-blocks", ProbeLoop(CacheBlocksProbe(live), live, fetch).run),
        ("dns-discovery", DnsDiscovery(live, on_round=gateway_metrics.discovery_round).run),
    ]
    for name, run in loops:
        app.cleanup_ctx.append(_background(name, run))
    forwarded = config.jobs is not None and worker is not None and worker.index > 0
    if config.jobs is not None and not forwarded:
        jobs = app[JOBS] = JobService(live, config.jobs, gateway_metrics, session)
        app.cleanup_ctx.append(jobs.lifetime)
        app.cleanup_ctx.append(_background("jobs", jobs.run))
    elif forwarded and worker is not None:  # worker 0 owns the store; it answers for us
        app.cleanup_ctx.append(jobs_forward.lifetime(worker.jobs_socket))
    own = [
        ("/healthz", ("GET", "HEAD"), healthz),
        ("/readyz", ("GET", "HEAD"), readyz),
        ("/metrics", ("GET", "HEAD"), metrics),
        ("/admin/replicas", ("GET", "HEAD"), admin_replicas),
        ("/admin/reload", ("POST",), admin_reload),
        ("/openapi.json", ("GET", "HEAD"), openapi),
        ("/ui", ("GET", "HEAD"), status.page),
        ("/ui/", ("GET", "HEAD"), status.page),  # the page's links are absolute: same page
        ("/ui/status.js", ("GET", "HEAD"), status.page),
        ("/ui/status.json", ("GET", "HEAD"), status.status),
    ]
    _add_routes(app, own, forwarded)
    return app


def _add_routes(
    app: web.Application, own: Sequence[tuple[str, tuple[str, ...], Handler]], forwarded: bool
) -> None:
    public, admin = _expecting(), _expecting(_require_admin)
    keyed = _expecting(authenticate, _body_fits)
    for path, methods, handler in own:
        checks = admin if path.startswith("/admin") else public
        app.router.add_route("*", path, _only(methods, handler), expect_handler=checks)
    for path, handler in (
        ("/v1/models", models.list_models),
        ("/v1/models/{model:.+}", models.get_model),
    ):
        route = require_key(_models_or_proxied(handler))
        app.router.add_route("*", path, route, expect_handler=keyed)
    for path, handlers in job_routes.ROUTES:
        jobs_handler = _only(tuple(handlers), job_routes.by_method(handlers))
        if forwarded:
            jobs_handler = _only(tuple(handlers), jobs_forward.forward)
        app.router.add_route("*", path, require_key(jobs_handler), expect_handler=keyed)
    # The /admin and /ui trees are the gateway's: an unknown path there is a 404 here, never a
    # request to a replica (which would carry the admin token to it).
    app.router.add_route("*", "/admin", admin_unknown, expect_handler=admin)
    app.router.add_route("*", "/admin/{tail:.*}", admin_unknown, expect_handler=admin)
    app.router.add_route("*", "/ui/{tail:.*}", status.unknown, expect_handler=public)
    proxied = _proxied(require_key(proxy.handle))
    app.router.add_route("*", "/{tail:.*}", proxied, expect_handler=_expecting(_proxied_checks))


__all__ = ["ConfigError", "create_app", "error_response"]
