"""The gateway's HTTP surface: the app factory, what lives with the app, and the routes, composed
in one place (the checks and the error middleware: checks.py; the gateway's own endpoints:
handlers.py).

Paths the gateway owns (/healthz, /readyz, /metrics, /openapi.json, /admin and /admin/..., /ui
and /ui/...) answer here and are never proxied; every other method and path goes to proxy.handle.
Admin endpoints need `Authorization: Bearer <token>` matching INFERGATE_ADMIN_TOKEN and answer 404
when no token is configured. Proxied and jobs requests need an API key when `auth` is configured
(gateway/datapath/auth.py); the gateway's own endpoints keep their own rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.app import handlers
from gateway.app.checks import (
    Handler,
    body_fits,
    error_middleware,
    expecting,
    is_admin_path,
    only,
    proxied_checks,
    require_admin,
)
from gateway.app.reload import ReloadWatcher
from gateway.app.state import APP, AppState
from gateway.app.workers import Worker
from gateway.config import GatewayConfig
from gateway.config.schema import OTEL_EXTRA, Tracing
from gateway.control.cache_blocks import CacheBlocksProbe
from gateway.control.discovery import DnsDiscovery
from gateway.control.fetch import SESSION, session_fetch
from gateway.control.health import HealthChecker
from gateway.control.kv_events import KvEventsFeed
from gateway.control.load import LoadProbe
from gateway.control.models import ModelsProbe
from gateway.control.probe import ProbeLoop
from gateway.datapath import proxy
from gateway.datapath.auth import authenticate, require_key
from gateway.datapath.h1client import UpstreamPool
from gateway.datapath.proxy import PROXY, UPSTREAM, Proxy
from gateway.datapath.transport import Upstream
from gateway.errors import ConfigError
from gateway.flow.limits import Leased
from gateway.jobs import forward as jobs_forward
from gateway.jobs import routes as job_routes
from gateway.jobs.service import JOBS, JobService
from gateway.ops import models, status
from gateway.ops.metrics import METRICS, GatewayMetrics
from gateway.pool.live import LIVE, Live, build_runtime
from gateway.pool.replicas import ReplicaPool

log = logging.getLogger(__name__)

WATCHER = web.AppKey("reload_watcher", ReloadWatcher)
HEALTH = web.AppKey("health_checker", HealthChecker)


def _models_or_proxied(handler: Handler) -> Handler:
    """The gateway's model list while it knows models; a replica's own answer otherwise."""
    guarded = only(("GET", "HEAD"), handler)

    async def route(request: web.Request) -> web.StreamResponse:
        if models.known(request.app[LIVE]):
            return await guarded(request)
        return await proxy.handle(request)

    return route


def _proxied(handler: Handler) -> Handler:
    """The catch-all route: a spelling of an admin path the router did not match stays here."""

    async def route(request: web.Request) -> web.StreamResponse:
        if is_admin_path(request.path):
            return await handlers.admin_unknown(request)
        return await handler(request)

    return route


def _add_tracing(app: web.Application, config: Tracing | None) -> None:
    """The proxy's tracer for the app's lifetime (`tracing:`, read at start-up only): opened in
    this process (each of `workers: N` has its own), shut down, and its spans sent, last."""
    if config is not None:
        app.cleanup_ctx.append(_tracing(config))


def _tracing(config: Tracing) -> Callable[[web.Application], AsyncIterator[None]]:

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        try:  # the opentelemetry modules are imported here, and only here
            from gateway.ops.tracing import GatewayTracer, open_provider
        except ImportError as exc:
            message = f"tracing: needs the OpenTelemetry packages: {OTEL_EXTRA} ({exc})"
            raise ConfigError(message) from None
        provider = open_provider(config.otlp_endpoint, config.sample_ratio, config.service_name)
        tracer = GatewayTracer(provider)
        app[PROXY].tracer = tracer
        try:
            yield
        finally:
            app[PROXY].tracer = None
            await tracer.close()

    return ctx


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
    limits = worker.limits if worker is not None else None
    service = worker.service if worker is not None else None
    pool = ReplicaPool(config.replica_urls, shared=shared)
    live = Live.start(build_runtime(config), pool, limits, service)
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
    _add_tracing(app, config.tracing)  # first: its spans are sent after the rest has stopped
    app.cleanup_ctx.append(_client_session)
    app.cleanup_ctx.append(_background("config-watch", app[WATCHER].run))
    fetch = session_fetch(session)
    kv_feed = KvEventsFeed(live, gateway_metrics.kv)
    gateway_metrics.exposition.register(gateway_metrics.kv.collector(kv_feed))
    loops: list[tuple[str, Callable[[], Coroutine[None, None, None]]]] = [
        ("health-checks", ProbeLoop(health, live, fetch).run),
        ("load-feedback", ProbeLoop(LoadProbe(live), live, fetch).run),
        ("served-models", ProbeLoop(ModelsProbe(live), live, fetch).run),
        ("cache-blocks", ProbeLoop(CacheBlocksProbe(live), live, fetch).run),
        ("kv-events", kv_feed.run),
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
    flow = config.flow_control
    if flow is not None and flow.store is not None:  # keys' limits leased from a shared store
        from gateway.control.limits_store import LimitsLoop, LimitsStore  # imports asyncpg

        live.limiter.leased = Leased(flow.store_slice_percent)
        if worker is None or worker.index == 0:  # the workers share worker 0's allowance
            errors = gateway_metrics.flow.store_errors
            feed = LimitsLoop(live, LimitsStore(flow.store), on_error=errors.inc)
            app.cleanup_ctx.append(feed.lifetime)
            app.cleanup_ctx.append(_background("limits-store", feed.run))
    own = [
        ("/healthz", ("GET", "HEAD"), handlers.healthz),
        ("/readyz", ("GET", "HEAD"), handlers.readyz),
        ("/metrics", ("GET", "HEAD"), handlers.metrics),
        ("/admin/replicas", ("GET", "HEAD"), handlers.admin_replicas),
        ("/admin/reload", ("POST",), handlers.admin_reload),
        ("/openapi.json", ("GET", "HEAD"), handlers.openapi),
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
    public, admin = expecting(), expecting(require_admin)
    keyed = expecting(authenticate, body_fits)
    for path, methods, handler in own:
        checks = admin if path.startswith("/admin") else public
        app.router.add_route("*", path, only(methods, handler), expect_handler=checks)
    for path, handler in (
        ("/v1/models", models.list_models),
        ("/v1/models/{model:.+}", models.get_model),
    ):
        route = require_key(_models_or_proxied(handler))
        app.router.add_route("*", path, route, expect_handler=keyed)
    for path, by_method in job_routes.ROUTES:
        jobs_handler = only(tuple(by_method), job_routes.by_method(by_method))
        if forwarded:
            jobs_handler = only(tuple(by_method), jobs_forward.forward)
        app.router.add_route("*", path, require_key(jobs_handler), expect_handler=keyed)
    # The /admin and /ui trees are the gateway's: an unknown path there is a 404 here, never a
    # request to a replica (which would carry the admin token to it).
    app.router.add_route("*", "/admin", handlers.admin_unknown, expect_handler=admin)
    app.router.add_route("*", "/admin/{tail:.*}", handlers.admin_unknown, expect_handler=admin)
    app.router.add_route("*", "/ui/{tail:.*}", status.unknown, expect_handler=public)
    proxied = _proxied(require_key(proxy.handle))
    app.router.add_route("*", "/{tail:.*}", proxied, expect_handler=expecting(proxied_checks))


__all__ = ["ConfigError", "create_app"]
