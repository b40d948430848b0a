"""Typed app-state keys shared by the app factory and the route modules."""

from __future__ import annotations

from aiohttp import web

from replica.config import ReplicaConfig
from replica.metrics import ReplicaMetrics
from replica.state import ReplicaState

CONFIG = web.AppKey("config", ReplicaConfig)
STATE = web.AppKey("state", ReplicaState)
METRICS = web.AppKey("metrics", ReplicaMetrics)
