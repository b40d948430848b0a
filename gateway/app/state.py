"""The composition root's own state: where the config came from, the admin token, and the
objects of the wings it wires together (the gateway in force, its metrics).

Only gateway/app reads it. Everything below the app gets what it uses: handlers read the
narrow keys of their wing (LIVE, PROXY, METRICS, SESSION, JOBS), loops and jobs are handed
their objects when the app makes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from gateway.ops.metrics import GatewayMetrics
from gateway.pool.live import Live


@dataclass(eq=False)
class AppState:
    config_path: Path | None
    live: Live
    metrics: GatewayMetrics
    admin_token: str | None


APP = web.AppKey("app_state", AppState)
