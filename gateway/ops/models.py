"""The gateway's own GET /v1/models and GET /v1/models/{model}: the union of what available
replicas serve, plus the aliases, in OpenAI's list shape (so `client.models.list()` works
through the gateway)."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from gateway.datapath.models import ModelNotFound, aliases, check
from gateway.errors import clipped
from gateway.pool.live import LIVE, Live

STARTED = int(time.time())


def model_list(live: Live) -> dict[str, Any]:
    """OpenAI's list: every model an available replica serves (its own card, from the first
    such replica), then each alias whose target is served."""
    cards: dict[str, dict[str, Any]] = {}
    for replica in live.pool.available():
        by_id = {str(c.get("id")): c for c in replica.model_cards}
        for model in sorted(replica.models or ()):
            cards.setdefault(model, by_id.get(model) or _card(model, "infergate"))
    for alias, target in aliases(live.runtime.config).items():
        if target in cards and alias not in cards:
            cards[alias] = {**_card(alias, "infergate"), "parent": target}
    return {"object": "list", "data": list(cards.values())}


def _card(model: str, owner: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": STARTED, "owned_by": owner}


def known(live: Live) -> bool:
    """Some replica lists its models, or the config names some: the gateway answers
    /v1/models itself (else it is proxied, a replica's own answer)."""
    return bool(live.pool.catalog() or live.runtime.config.models)


async def list_models(request: web.Request) -> web.Response:
    return web.json_response(model_list(request.app[LIVE]))


async def get_model(request: web.Request) -> web.Response:
    """OpenAI's retrieve-model: the card of one listed model, or a 404 naming what is served."""
    live = request.app[LIVE]
    name = request.match_info["model"]
    for card in model_list(live)["data"]:
        if card["id"] == name:
            return web.json_response(card)
    target = aliases(live.runtime.config).get(name, name)
    check(live, target, name)  # served but out of rotation: the 503 says so
    raise ModelNotFound(f"model '{clipped(name)}' is not listed by any replica")
