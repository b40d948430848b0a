"""The gateway's own endpoints: /healthz, /readyz, /metrics, /openapi.json and /admin/...
(admin needs the token: checks.require_admin)."""

from __future__ import annotations

import os
import signal
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.app.checks import require_admin
from gateway.app.reload import reload_config_off_loop
from gateway.app.state import AppState
from gateway.ops import status
from gateway.ops.metrics import METRICS
from gateway.ops.openapi import DOCUMENT
from gateway.pool.live import LIVE


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
    return web.json_response(_describe_state(require_admin(request)))


async def admin_reload(request: web.Request) -> web.Response:
    state = require_admin(request)
    await reload_config_off_loop(state, "admin")
    if state.live.worker is not None:  # the sibling workers reload too: the supervisor tells them
        os.kill(os.getppid(), signal.SIGHUP)
    return web.json_response({"result": "ok", **_describe_state(state)})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(DOCUMENT)


async def admin_unknown(request: web.Request) -> web.Response:
    require_admin(request)
    raise web.HTTPNotFound(text=f"no admin endpoint {request.path}")
