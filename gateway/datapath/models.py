"""Model-name routing: which model a request asks for, which replicas serve it, and the
`models:` section's aliases and per-model strategies.

A request's model is the JSON body's `model` on OpenAI paths (`/v1/...`), or the name in a KServe
v2 path (`/v2/models/{name}/...`); a request without one (`/invocations`, `/ping`) goes to any
replica, as before. An alias (`{name: chat, target: tiny-gpt}`) is resolved first and the
request rewritten to the served name, as LiteLLM's model_name does. Each replica's models come
from `replicas[].models` or its GET /v1/models (control/models.py, each `served_models.interval_s`);
a replica whose list is unknown may serve anything, so while one such replica is available no
model is refused as unknown. Otherwise an unknown model is a 404 naming what is served, and a
known one whose replicas are all down a 503 naming the model.

What replicas serve is polled by gateway/control/models.py; the gateway's own GET /v1/models is
gateway/ops/models.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

from gateway.config import GatewayConfig
from gateway.errors import GatewayError, NoHealthyReplica, clipped
from gateway.pool.live import Live

V2_PREFIX = "/v2/models/"
Payload = dict[str, Any] | None  # a JSON body parsed (gateway/datapath/classify.py)


class ModelNotFound(GatewayError):
    status = 404
    error_type = "model_not_found"


@dataclass(frozen=True)
class Target:
    """Where a request's model routes: the served name, and the request as it must be sent."""

    model: str | None  # the served model; None: any replica
    asked: str | None  # the name the client sent (an alias, or the served name)
    body: bytes
    path_qs: str | None = None  # a rewritten /v2/models/{alias}/... path, else unchanged


def requested(path: str, payload: Callable[[], Payload]) -> str | None:
    """The model a request (its raw path without the query; its body, parsed when asked)
    names."""
    if path.startswith(V2_PREFIX):
        return unquote(path[len(V2_PREFIX) :].split("/", 1)[0]) or None
    if not path.startswith("/v1/"):
        return None
    body = payload()
    model = body.get("model") if body is not None else None
    return model if isinstance(model, str) and model else None


def route(live: Live, path_qs: str, body: bytes, payload: Callable[[], Payload]) -> Target:
    """The served model a request (its raw path and query, and body) goes to, with the body or
    path rewritten for an alias; ModelNotFound (404) or NoHealthyReplica (503) when no replica
    can take it."""
    config = live.runtime.config
    if not config.models and not live.pool.catalog():
        return Target(None, None, body)  # nothing known of models: route as before
    path, sep, query = path_qs.partition("?")
    asked = requested(path, payload)
    if asked is None:
        return Target(None, None, body)
    target = aliases(config).get(asked, asked)
    check(live, target, asked)
    if target == asked:
        return Target(target, asked, body)
    if not path.startswith(V2_PREFIX):
        rewritten = payload()
        assert rewritten is not None  # the model was read from it
        rewritten["model"] = target
        return Target(target, asked, json.dumps(rewritten).encode())
    rest = path[len(V2_PREFIX) :].split("/", 1)
    path = V2_PREFIX + quote(target, safe="") + ("/" + rest[1] if len(rest) > 1 else "")
    return Target(target, asked, body, path + sep + query)


def aliases(config: GatewayConfig) -> dict[str, str]:
    return {m.name: m.target for m in config.models if m.target is not None}


def check(live: Live, model: str, asked: str) -> None:
    """404 for a model nobody serves (while every replica's list is known), 503 for one whose
    replicas are all out of rotation."""
    pool = live.pool
    if pool.available_for(model):
        return
    catalog = pool.catalog()
    named = f"'{clipped(asked)}'" + (f" (alias of '{model}')" if asked != model else "")
    configured = any(m.name == model for m in live.runtime.config.models)
    if model in catalog or configured or pool.any_open():
        raise NoHealthyReplica(f"no healthy replica serves model {named}; see /admin/replicas")
    served = sorted(
        {*catalog, *(a for a, t in aliases(live.runtime.config).items() if t in catalog)}
    )
    listed = ", ".join(served[:50]) + (", ..." if len(served) > 50 else "") or "none"
    raise ModelNotFound(f"model {named} is not served; available: {listed}")
