"""Served models: every `served_models.interval_s`, each replica's GET /v1/models, so model
routing (gateway/datapath/models.py) knows which replicas serve which model.

A list sets what the replica serves; a 404 (no such endpoint) makes it open to any model; a
failure keeps the last list (health checks judge a dead replica) and is logged once per bad
streak. /readyz waits for the first round (`Live.models_polled`), so a fresh gateway takes no
request before it knows where models are.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp

from gateway.config import ServedModels
from gateway.control.fetch import POLL_FAILURES, PollFailures, Session, get_json
from gateway.pool.live import Live
from gateway.routing.replica import Replica

log = logging.getLogger(__name__)
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


class ModelPoller:
    """Every `served_models.interval_s`, the GET /v1/models of each replica in rotation; a
    replica that joins (reload, discovery) is asked at once."""

    def __init__(self, live: Live, session: Session) -> None:
        self._live = live
        self._session = session
        self._failures = PollFailures(log, "served models", "its last list stands")

    async def run(self) -> None:
        while True:
            served = self._live.runtime.config.served_models
            if served.path is None:  # may be switched on by a reload
                self._live.models_polled = True
                await asyncio.sleep(self._live.runtime.config.reload.poll_interval_s)
                continue
            await self.poll_once(served)
            self._live.models_polled = True
            # A replica that joins (reload, discovery) is asked at once, the rest every interval.
            for _ in range(max(1, round(served.interval_s / NEW_REPLICA_CHECK_S))):
                await asyncio.sleep(min(NEW_REPLICA_CHECK_S, served.interval_s))
                await self.poll_once(served, only_new=True)

    async def poll_once(self, served: ServedModels, only_new: bool = False) -> None:
        """The list of every replica in rotation (one out of it takes no request, and keeps
        its last list until it is back); `only_new`: those not asked yet."""
        self._failures.keep({r.url for r in self._live.pool.active()})
        replicas = [
            r for r in self._live.pool.available()
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
                self._session(), url, max_bytes=MAX_LIST_BYTES, limit=limit
            )
        except POLL_FAILURES as error:
            self._failures.failed(replica.url, error)
            return
        self._failures.ok(replica.url)
        if status in (404, 405):
            self._live.pool.set_models(replica, None)
            return
        cards = cards_of(document)
        if status == 200 and cards is not None:
            self._live.pool.set_models(replica, cards)
