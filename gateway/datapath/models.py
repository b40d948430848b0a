"""Model-name routing: which model a request asks for, which replicas serve it, and the
`models:` section's aliases and per-model strategies.

A request's model is the JSON body's `model` on OpenAI paths (`/v1/...`), or the name in a KServe
v2 path (`/v2/models/{name}/...`); a request without one (`/invocations`, `/ping`) goes to any
replica, as before. An alias (`{name: chat, target: tiny-gpt}`) is resolved first and the
request rewritten to the served name, as LiteLLM's model_name does. Each replica's models come
from `replicas[].models` or its GET /v1/models (ModelPoller, every `served_models.interval_s`);
a replica whose list is unknown may serve anything, so while one such replica is available no
model is refused as unknown. Otherwise an unknown model is a 404 naming what is served, and a
known one whose replicas are all down a 503 naming the model.

The gateway's own GET /v1/models answers the union of what available replicas serve, plus the
aliases, in OpenAI's list shape (so `client.models.list()` works through the gateway).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

import aiohttp
from aiohttp import web

from gateway.app.state import STATE, GatewayState
from gateway.config import GatewayConfig, ServedModels
from gateway.control.health import POLL_FAILURES, PollFailures, get_json
from gateway.errors import GatewayError, NoHealthyReplica, clipped
from gateway.routing.replica import Replica

log = logging.getLogger(__name__)
V2_PREFIX = "/v2/models/"
PARSE_MAX_BYTES = 8 * 1024 * 1024  # a larger body goes to any replica of the pool unread
UTF8_BOM = b"\xef\xbb\xbf"
MAX_LIST_BYTES = 1024 * 1024
MAX_MODELS_PER_REPLICA = 1024  # a /v1/models list longer than this is cut (bounded labels)
NEW_REPLICA_CHECK_S = 0.1  # how soon a replica that joined is asked for its list
STARTED = int(time.time())


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


def requested(path: str, body: bytes) -> tuple[str | None, dict[str, Any] | None]:
    """The model a request (its raw path without the query, its body) names, and its parsed
    JSON body when that was read for it."""
    if path.startswith(V2_PREFIX):
        name = unquote(path[len(V2_PREFIX) :].split("/", 1)[0])
        return (name or None), None
    if not path.startswith("/v1/") or not body or len(body) > PARSE_MAX_BYTES:
        return None, None
    if body.lstrip().removeprefix(UTF8_BOM)[:1] != b"{":
        return None, None
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return None, None  # the replica will say what is wrong with it
    if not isinstance(payload, dict):
        return None, None
    model = payload.get("model")
    return (model if isinstance(model, str) and model else None), payload


def route(state: GatewayState, path_qs: str, body: bytes) -> Target:
    """The served model a request (its raw path and query, and body) goes to, with the body or
    path rewritten for an alias; ModelNotFound (404) or NoHealthyReplica (503) when no replica
    can take it."""
    config = state.runtime.config
    if not config.models and not state.pool.catalog():
        return Target(None, None, body)  # nothing known of models: route as before
    path, sep, query = path_qs.partition("?")
    asked, payload = requested(path, body)
    if asked is None:
        return Target(None, None, body)
    target = aliases(config).get(asked, asked)
    check(state, target, asked)
    if target == asked:
        return Target(target, asked, body)
    if payload is not None:
        payload["model"] = target
        return Target(target, asked, json.dumps(payload).encode())
    rest = path[len(V2_PREFIX) :].split("/", 1)
    path = V2_PREFIX + quote(target, safe="") + ("/" + rest[1] if len(rest) > 1 else "")
    return Target(target, asked, body, path + sep + query)


def aliases(config: GatewayConfig) -> dict[str, str]:
    return {m.name: m.target for m in config.models if m.target is not None}


def check(state: GatewayState, model: str, asked: str) -> None:
    """404 for a model nobody serves (while every replica's list is known), 503 for one whose
    replicas are all out of rotation."""
    pool = state.pool
    if pool.available_for(model):
        return
    catalog = pool.catalog()
    named = f"'{clipped(asked)}'" + (f" (alias of '{model}')" if asked != model else "")
    configured = any(m.name == model for m in state.runtime.config.models)
    if model in catalog or configured or pool.any_open():
        raise NoHealthyReplica(f"no healthy replica serves model {named}; see /admin/replicas")
    served = sorted(
        {*catalog, *(a for a, t in aliases(state.runtime.config).items() if t in catalog)}
    )
    listed = ", ".join(served[:50]) + (", ..." if len(served) > 50 else "") or "none"
    raise ModelNotFound(f"model {named} is not served; available: {listed}")


def model_list(state: GatewayState) -> dict[str, Any]:
    """OpenAI's list: every model an available replica serves (its own card, from the first
    such replica), then each alias whose target is served."""
    cards: dict[str, dict[str, Any]] = {}
    for replica in state.pool.available():
        by_id = {str(c.get("id")): c for c in replica.model_cards}
        for model in sorted(replica.models or ()):
            cards.setdefault(model, by_id.get(model) or _card(model, "infergate"))
    for alias, target in aliases(state.runtime.config).items():
        if target in cards and alias not in cards:
            cards[alias] = {**_card(alias, "infergate"), "parent": target}
    return {"object": "list", "data": list(cards.values())}


def _card(model: str, owner: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": STARTED, "owned_by": owner}


def known(state: GatewayState) -> bool:
    """Some replica lists its models, or the config names some: the gateway answers
    /v1/models itself (else it is proxied, a replica's own answer)."""
    return bool(state.pool.catalog() or state.runtime.config.models)


async def list_models(request: web.Request) -> web.Response:
    return web.json_response(model_list(request.app[STATE]))


async def get_model(request: web.Request) -> web.Response:
    """OpenAI's retrieve-model: the card of one listed model, or a 404 naming what is served."""
    state = request.app[STATE]
    name = request.match_info["model"]
    for card in model_list(state)["data"]:
        if card["id"] == name:
            return web.json_response(card)
    target = aliases(state.runtime.config).get(name, name)
    check(state, target, name)  # served but out of rotation: the 503 says so
    raise ModelNotFound(f"model '{clipped(name)}' is not listed by any replica")


def cards_of(document: Any) -> list[dict[str, Any]] | None:
    """The entries of an OpenAI model list (`{"data": [{"id": ...}, ...]}`); None if it is not
    one. vLLM lists its LoRA adapters here too, so they route like models."""
    data = document.get("data") if isinstance(document, dict) else None
    if not isinstance(data, list):
        return None
    cards = []
    for entry in data[:MAX_MODELS_PER_REPLICA]:
        if isinstance(entry, dict) and isinstance(entry.get("id"), str) and entry["id"]:
            cards.append({k: v for k, v in entry.items() if k != "permission"})
    return cards


class ModelPoller:
    """Every `served_models.interval_s`, the GET /v1/models of each replica in rotation. A
    list sets what the replica serves; a 404 (no such endpoint) makes it open to any model; a
    failure keeps the last list (health checks judge a dead replica) and is logged once per
    bad streak. /readyz waits for the first round, so a fresh gateway takes no request before
    it knows where models are."""

    def __init__(self, state: GatewayState) -> None:
        self._state = state
        self._failures = PollFailures(log, "served models", "its last list stands")

    async def run(self) -> None:
        while True:
            served = self._state.runtime.config.served_models
            if served.path is None:  # may be switched on by a reload
                self._state.models_polled = True
                await asyncio.sleep(self._state.runtime.config.reload.poll_interval_s)
                continue
            await self.poll_once(served)
            self._state.models_polled = True
            # A replica that joins (reload, discovery) is asked at once, the rest every interval.
            for _ in range(max(1, round(served.interval_s / NEW_REPLICA_CHECK_S))):
                await asyncio.sleep(min(NEW_REPLICA_CHECK_S, served.interval_s))
                await self.poll_once(served, only_new=True)

    async def poll_once(self, served: ServedModels, only_new: bool = False) -> None:
        """The list of every replica in rotation (one out of it takes no request, and keeps
        its last list until it is back); `only_new`: those not asked yet."""
        self._failures.keep({r.url for r in self._state.pool.active()})
        replicas = [
            r for r in self._state.pool.available()
            if r.configured_models is None and not (only_new and r.models_asked)
        ]  # fmt: skip
        await asyncio.gather(*(self._poll(r, served) for r in replicas))

    async def _poll(self, replica: Replica, served: ServedModels) -> None:
        assert served.path is not None
        replica.models_asked = True
        limit = aiohttp.ClientTimeout(total=served.timeout_s)
        url = replica.url + served.path
        try:
            status, document = await get_json(
                self._state.client(), url, max_bytes=MAX_LIST_BYTES, limit=limit
            )
        except POLL_FAILURES as error:
            self._failures.failed(replica.url, error)
            return
        self._failures.ok(replica.url)
        if status in (404, 405):
            self._state.pool.set_models(replica, None)
            return
        cards = cards_of(document)
        if status == 200 and cards is not None:
            self._state.pool.set_models(replica, cards)
