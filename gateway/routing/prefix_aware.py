"""Prefix-aware routing: cache reuse against load, in one cost in tokens of prefill.
PrefixAware learns from the gateway's own dispatches; PrecisePrefix reads what the replicas
say they hold (gateway/control/kv_events.py, gateway/control/cache_blocks.py)."""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import ClassVar

from gateway.routing.base import Cost, Policy, least, stable_hash
from gateway.routing.options import PolicyOptions
from gateway.routing.prefix import PrefixIndex
from gateway.routing.replica import Replica
from gateway.routing.request import Need, RequestInfo


class PrefixAware(Policy):
    """Cache reuse against load, in one cost in tokens of prefill: for each replica, the prompt
    tokens it would have to prefill (those past the longest run of the prompt's blocks it is
    known to hold) plus what its load costs this request; the cheapest wins, ties at random.
    (The prompt's length is the same everywhere, so the cost computed is `load cost - cached
    tokens`.) A replica's load is its outstanding requests (with those of other gateways while
    its report is fresh). Where its capacity is known (its `max_concurrency`, or the `capacity`
    it reports), a request that finds a free slot costs `tokens_per_running` (another sequence
    in the batch) and one that would wait for a slot `tokens_per_queued`; where it is not, every
    request costs `tokens_per_outstanding`.

    The guard against imbalance is relative, so it behaves alike at 2 and at 200 replicas: a
    replica gets credit for its cache only while it has a free slot or holds less than
    `balance_factor` x the fleet's mean load (rounded up, counting this request), and never at
    `concurrency_threshold` or above. The index learns from the gateway's own dispatches
    (`on_dispatch`, once a lease is granted: a choice that is never sent teaches nothing; bounded,
    LRU; replicas that leave are dropped). A request with a session header and no prompt the
    gateway can read goes where its session went last, within the same guard. SageMaker's
    PREFIX_AWARE routing names the same two knobs (`prefix_length`, `concurrency_threshold`)."""

    needs: ClassVar[frozenset[Need]] = frozenset({"prefix"})
    MAX_SESSIONS = 65_536

    def __init__(self, rng: random.Random, options: PolicyOptions) -> None:
        self._rng = rng
        self._options = options.prefix
        self._max_age_s = options.feedback_max_age_s
        self._clock = options.clock
        self.index = PrefixIndex(self._options.max_entries)
        self._sessions: OrderedDict[str, tuple[str, int]] = OrderedDict()  # url, prompt tokens

    def choose(self, replicas: Sequence[Replica], request: RequestInfo) -> Replica:
        return self._least(replicas, self.cost(replicas, request), request)

    def cost(self, replicas: Sequence[Replica], request: RequestInfo) -> Cost:
        o = self._options
        now = self._clock()
        matched = self.matched(request)
        loads = {r.url: r.load(now, self._max_age_s) for r in replicas}
        bound = math.ceil(o.balance_factor * (sum(loads.values()) + 1) / len(replicas))
        cap = o.concurrency_threshold

        def cost(r: Replica) -> float:
            load, slots = loads[r.url], self.capacity(r, now)
            if slots is None:
                load_cost = o.tokens_per_outstanding * load
                free = False
            else:
                queued = max(0, load + 1 - slots)
                load_cost = o.tokens_per_running * min(load, slots) + o.tokens_per_queued * queued
                free = queued == 0
            hit = matched.get(r.url, 0)
            if not (free or load + 1 <= bound) or (cap is not None and load >= cap):
                hit = 0
            return load_cost - hit

        return cost

    def capacity(self, replica: Replica, now: float) -> int | None:
        """Requests the replica runs at once: its configured limit, else its fresh report."""
        if replica.max_concurrency:
            return replica.max_concurrency
        report = replica.reported or {}
        fresh = now - replica.reported_at <= self._max_age_s
        slots = report.get("capacity", 0) if fresh else 0
        return int(slots) if slots >= 1 else None

    def _least(
        self, replicas: Sequence[Replica], cost: Callable[[Replica], float], request: RequestInfo
    ) -> Replica:
        return least(replicas, cost, self._rng)

    def matched(self, request: RequestInfo) -> dict[str, float]:
        """Prompt tokens each replica is thought to hold already."""
        blocks = self.index.matched_blocks(request.prefix)
        matched = {url: n * self._options.block_size for url, n in blocks.items()}
        if not request.prefix and request.key is not None:
            url, tokens = self._sessions.get(request.key, (None, 0))
            if url is not None:
                matched[url] = tokens  # its last prompt, as far as the gateway could read it
        return matched

    def on_dispatch(self, replica: Replica, request: RequestInfo) -> None:
        self.index.insert(replica.url, request.prefix)
        if request.key is not None:
            last = self._sessions.get(request.key, ("", 0))[1]
            self._sessions[request.key] = (replica.url, max(request.prompt_tokens, last, 1))
            self._sessions.move_to_end(request.key)
            if len(self._sessions) > self.MAX_SESSIONS:
                self._sessions.popitem(last=False)

    def replicas_changed(self, urls: Sequence[str]) -> None:
        self.index.forget_all_but(urls)
        kept = set(urls)
        for key in [k for k, (url, _) in self._sessions.items() if url not in kept]:
            del self._sessions[key]


class PrecisePrefix(PrefixAware):
    """PrefixAware on what the replicas hold, not on what the gateway sent: the index is what
    each replica says it holds, from its KV cache events as they happen
    (gateway/control/kv_events.py) or from its `GET /cache/blocks` report, replaced at every
    poll (gateway/control/cache_blocks.py), so evictions and restarts show within one poll
    interval.
    Ties go to the replica whose
    hash with the prompt's first block is highest (rendezvous hashing), so a new prefix keeps to
    one replica until the replicas report it, and gateways that see the same reports and loads
    make the same choice."""

    needs: ClassVar[frozenset[Need]] = frozenset({"prefix", "cache_blocks"})

    def on_dispatch(self, replica: Replica, request: RequestInfo) -> None:
        if request.key is not None:  # sessions are remembered; blocks come from the replicas
            super().on_dispatch(
                replica, RequestInfo(key=request.key, prompt_tokens=request.prompt_tokens)
            )

    def on_cache(
        self,
        url: str,
        held: Mapping[int, float],
        dropped: Collection[int] = (),
        *,
        replace: bool = False,
    ) -> None:
        if replace:
            self.index.forget(url)
        self.index.release(url, dropped)
        self.index.hold(url, held)

    def _least(
        self, replicas: Sequence[Replica], cost: Callable[[Replica], float], request: RequestInfo
    ) -> Replica:
        seed = str(request.prefix[0] if request.prefix else request.key or "")
        return min(replicas, key=lambda r: (cost(r), -stable_hash(f"{seed}|{r.url}")))
