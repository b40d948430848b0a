"""The status page at /ui: one HTML page and a small script (gateway/ops/ui/, no build step) that
poll /ui/status.json, built here from the pool, the strategy, the recent-traffic windows, the
charts' history (gateway/ops/history.py: each read takes a point when one is due, so an open
page keeps an idle gateway's charts going) and the last routing decisions.

Read-only and public, like HAProxy's stats page: it shows replica URLs and counts, no config
secrets and no admin action. `ui: {enabled: false}` turns it off (404), live on reload.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.ops.metrics import METRICS, GatewayMetrics
from gateway.ops.tenants import tenants_document
from gateway.pool.live import LIVE, Live
from gateway.pool.replicas import publish_totals
from gateway.pool.shared import STATS
from gateway.routing.replica import Replica

UI_DIR = Path(__file__).with_name("ui")
ASSETS = {"/ui": "index.html", "/ui/": "index.html", "/ui/status.js": "status.js"}
CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript"}
HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'",
}


@cache
def _asset(name: str) -> bytes:
    return (UI_DIR / name).read_bytes()


def replica_json(replica: Replica) -> dict[str, Any]:
    """A replica's state with the whole gateway's totals: with `workers: N`, every worker's
    (this one's as of now, its siblings' as of their last finished request)."""
    out = replica.as_json()
    if replica.shared is not None:
        publish_totals(replica)
        out.update(zip(STATS, replica.shared.stats(replica.column), strict=True))
    return out


def status_document(live: Live, metrics: GatewayMetrics) -> dict[str, Any]:
    recent = metrics.recent
    replicas = live.pool.all()
    config = live.runtime.config
    strategies = {m.name: m.strategy for m in config.models if m.strategy}
    models = [
        {
            "name": name,
            "replicas": len(serving),
            "available": len(live.pool.available_for(name)),
            "strategy": strategies.get(name, config.routing.strategy),
            "aliases": sorted(m.name for m in config.models if m.target == name),
        }
        for name, serving in sorted(live.pool.catalog().items())
    ]
    return {
        "strategy": config.routing.strategy,
        "load_source": config.load_feedback.source,
        "worker": live.worker[0] if live.worker is not None else None,  # `workers: N`
        "models": models,
        "discovery": config.discovery.dns if config.discovery else None,
        "draining": live.draining,
        "outstanding": live.pool.outstanding_everywhere(),
        "queued": live.admission.queued_everywhere(),
        "recent": recent.summary(),  # this worker's traffic (`worker`), under `workers: N`
        "replicas": [{**replica_json(r), "recent": recent.summary(r.url)} for r in replicas],
        "flow_control": config.flow_control is not None,
        "tenants": tenants_document(live, metrics.flow),
        "history": metrics.history.as_json(),  # this worker's, but for outstanding (history.py)
        "decisions": metrics.decisions.as_json(),  # this worker's, newest first
    }


def _enabled(request: web.Request) -> Live:
    live = request.app[LIVE]
    if not live.runtime.config.ui.enabled:
        raise web.HTTPNotFound(text="the status page is off (ui.enabled: false)")
    return live


async def page(request: web.Request) -> web.Response:
    _enabled(request)
    name = ASSETS[request.path]
    content_type = CONTENT_TYPES[Path(name).suffix]
    return web.Response(body=_asset(name), content_type=content_type, headers=HEADERS)


async def status(request: web.Request) -> web.Response:
    live, metrics = _enabled(request), request.app[METRICS]
    metrics.history.tick()
    document = status_document(live, metrics)
    return web.json_response(document, headers=HEADERS)


async def unknown(request: web.Request) -> web.Response:
    _enabled(request)
    raise web.HTTPNotFound(text=f"no status page resource {request.path}")
