"""Served models: every `served_models.interval_s`, each replica's GET /v1/models, so model
routing (gateway/datapath/models.py) knows which replicas serve which model.

A list sets what the replica serves; a 404 (no such endpoint) makes it open to any model; a
failure keeps the last list (health checks judge a dead replica) and is logged once per bad
streak. A replica that joins (reload, discovery) is asked within NEW_REPLICA_CHECK_S, the rest
every interval. /readyz waits for the first round (`Live.models_polled`), so a fresh gateway
takes no request before it knows where models are. The loop is control/probe.py's.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from gateway.control.probe import Ask, Plan, Probe
from gateway.pool.live import Live

MAX_LIST_BYTES = 1024 * 1024
MAX_MODELS_PER_REPLICA = 1024  # a /v1/models list longer than this is cut (bounded labels)
NEW_REPLICA_CHECK_S = 0.1  # how soon a replica that joined is asked for its list


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


@dataclass(frozen=True)
class Served:
    cards: list[dict[str, Any]] | None  # None: the replica has no list, it may serve anything


def read_models(status: int, body: bytes) -> Served | None:
    """What a replica's answer to GET /v1/models says it serves; None when it says nothing
    (an error status, JSON that is no model list). Malformed JSON raises ValueError (or
    RecursionError)."""
    if status in (404, 405):  # no such endpoint
        return Served(None)
    if status != 200:
        return None
    cards = cards_of(json.loads(body))
    return None if cards is None else Served(cards)


class ModelsProbe(Probe[Served | None]):
    """The list of every replica in rotation (one out of it takes no request, and keeps its
    last list until it is back) whose models the config does not name."""

    name = "served models"
    consequence = "its last list stands"
    log = logging.getLogger(__name__)

    def __init__(self, live: Live) -> None:
        self._live = live

    def plan(self) -> Plan[Served | None] | None:
        served = self._live.runtime.config.served_models
        if served.path is None:
            return None
        path = served.path
        replicas = [r for r in self._live.pool.available() if r.configured_models is None]
        asks = [Ask(replica, path) for replica in replicas]
        return Plan(
            asks, read_models, served.interval_s, served.timeout_s, MAX_LIST_BYTES,
            new_replica_s=NEW_REPLICA_CHECK_S,
        )  # fmt: skip

    def apply(self, ask: Ask, value: Served | None) -> None:
        if value is not None:
            self._live.pool.set_models(ask.replica, value.cards)

    def round_done(self) -> None:
        self._live.models_polled = True

    def off(self) -> None:
        self._live.models_polled = True
