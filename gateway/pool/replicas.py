"""The replica pool: the one owner of per-replica state (outstanding count and work, health,
ejection, reported load, latency, totals).

The request path brackets each dispatch with acquire/release in one try/finally, so the
outstanding count covers a request from dispatch until its response is fully relayed, the
upstream fails, or the client goes away. The pool outlives config reloads: a reload hands it
the new replica list, replicas that stay keep their counts, and removed ones drain (they take
no new requests and disappear once their last request ends).

Load feedback: replicas report how many requests they hold (`X-Replica-Load` on every response,
`GET /load` when polled). What matters for routing is the part this gateway cannot see, the
requests other gateways sent: `remote` = reported - ours at the moment of the report. A
replica's load is then `outstanding + remote` while the report is fresh.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from gateway.routing.replica import Outcome, Replica

if TYPE_CHECKING:
    from gateway.pool.shared import SharedCounts

MAX_COUNT = 2**53  # what a float holds exactly: a larger "count" is no replica's
MAX_REPORT_KEYS = 32  # our replica sends 8; more is no load report (bounded status page)
SHARES = frozenset({"kv_usage"})  # always a share, even when 0 or 1
# ASCII only, by regex: str.isdigit() also takes '²' (which int() refuses) and '٣' (which it
# takes), and int() refuses more than 4,300 digits; a bad value costs its key, never the request.
_KEY = re.compile(r"[A-Za-z0-9_]{1,64}", re.ASCII)
_COUNT = re.compile(r"[0-9]{1,16}", re.ASCII)
_SHARE = re.compile(r"[01]?\.[0-9]{1,6}", re.ASCII)  # 0 and 1 match _COUNT


def parse_load_report(text: str) -> dict[str, float]:
    """`queued=1,running=4,inflight=5,kv_usage=0.25` (the X-Replica-Load header) -> the load
    report `load_report` takes from it; malformed parts are skipped."""
    values: dict[str, object] = {}
    for part in text.split(",", MAX_REPORT_KEYS):
        key, _, value = part.partition("=")
        value = value.strip()
        if _COUNT.fullmatch(value):
            values[key.strip()] = int(value)
        elif _SHARE.fullmatch(value):
            values[key.strip()] = float(value)
    return load_report(values)


def load_report(values: Mapping[str, object]) -> dict[str, float]:
    """What a replica's load report may say (the header, or GET /load's JSON): each value a
    count (a whole number from 0 below 2**53) or a share (from 0 to 1; `kv_usage` always one);
    any other key, type or value (bool, NaN, negative, a string, a nested object) is left out."""
    report: dict[str, float] = {}
    for key, value in values.items():
        if len(report) == MAX_REPORT_KEYS:
            break
        if not _KEY.fullmatch(key) or isinstance(value, bool):
            continue
        if not isinstance(value, int | float) or not 0 <= value < MAX_COUNT:  # NaN fails too
            continue
        whole = value == int(value)
        if value <= 1 and (key in SHARES or not whole):
            report[key] = float(value)
        elif whole and key not in SHARES:
            report[key] = int(value)
    return report


def publish_totals(replica: Replica) -> None:
    """This worker's totals at the replica, for its siblings to sum (`workers: N`): after every
    request's end (admission calls it once the outcome is counted) and before each read of the
    whole gateway's (the status page, /admin/replicas)."""
    if replica.shared is not None:
        totals = (replica.requests_total, replica.errors_total, replica.ejections)
        replica.shared.publish(replica.column, totals)


class ReplicaPool:
    def __init__(
        self,
        urls: Iterable[str],
        clock: Callable[[], float] = time.monotonic,
        shared: SharedCounts | None = None,
    ) -> None:
        self._shared = shared
        self._active: dict[str, Replica] = {url: self._new(url) for url in urls}
        self._draining: dict[str, Replica] = {}
        self._available: tuple[Replica, ...] | None = None
        self._by_model: dict[str, tuple[Replica, ...]] = {}
        self._catalog: dict[str, list[Replica]] | None = None
        self._clock = clock
        self._ejected = 0
        self.outstanding = 0  # over every replica, draining ones included
        self.replica_limits = False  # some replica has its own max_concurrency
        # A signal: each is called when the available replicas (or what they serve) changed.
        self.changed: list[Callable[[], None]] = []

    @property
    def shared(self) -> SharedCounts | None:
        return self._shared

    def outstanding_everywhere(self) -> int:
        """Requests in flight in this gateway: with `workers: N`, in every worker."""
        return self.outstanding if self._shared is None else self._shared.total_outstanding()

    def _new(self, url: str) -> Replica:
        replica = Replica(url)
        if self._shared is not None:
            replica.shared, replica.column = self._shared, self._shared.hold(url)
        return replica

    def _gone(self, replica: Replica) -> None:
        """A replica left the pool, its last request done."""
        if self._shared is not None:
            self._shared.drop(replica.url)

    def available(self) -> Sequence[Replica]:
        """Replicas a policy may choose from: configured, healthy, not draining, not ejected."""
        if self._ejected:
            self._return_ejected()
        if self._available is None:
            self._available = tuple(
                r for r in self._active.values() if r.healthy and not r.ejected_until
            )
            self._by_model.clear()
        return self._available

    def available_for(self, model: str | None) -> Sequence[Replica]:
        """The available replicas that serve `model` (all of them for a request without one):
        those that list it, else (none does) those whose list is unknown, which may."""
        available = self.available()
        if model is None:
            return available
        found = self._by_model.get(model)
        if found is None:
            # Replicas that list it; only when none does, those whose list is unknown.
            found = tuple(r for r in available if r.models is not None and model in r.models)
            found = found or tuple(r for r in available if r.models is None)
            if model in self.catalog():  # never cache what a client made up
                self._by_model[model] = found
        return found

    def set_models(self, replica: Replica, cards: Sequence[dict[str, Any]] | None) -> None:
        """What a replica's GET /v1/models listed (None: it has no such list, so it may serve
        anything); a configured `models:` list stays in force."""
        if replica.configured_models is not None:
            return
        models = frozenset(str(c["id"]) for c in cards) if cards is not None else None
        replica.model_cards = tuple(cards or ())
        if models != replica.models:
            replica.models = models
            self._available = self._catalog = None
            self._changed()

    def _changed(self) -> None:
        for subscriber in self.changed:
            subscriber()

    def catalog(self) -> dict[str, list[Replica]]:
        """Every model an active replica is known to serve, and those replicas (shared: do not
        change it)."""
        if self._catalog is None:
            self._catalog = {}
            for replica in self._active.values():
                for model in sorted(replica.models or ()):
                    self._catalog.setdefault(model, []).append(replica)
        return self._catalog

    def any_open(self) -> bool:
        """Some replica in rotation has no known list: it may serve a model no list names."""
        return any(r.models is None for r in self.available())

    def all(self) -> list[Replica]:
        return [*self._active.values(), *self._draining.values()]

    def active(self) -> list[Replica]:
        return list(self._active.values())

    def get(self, url: str) -> Replica | None:
        return self._active.get(url)

    def update(
        self,
        urls: Sequence[str],
        max_concurrency: Mapping[str, int | None] | None = None,
        models: Mapping[str, Collection[str] | None] | None = None,
    ) -> None:
        """Swap in a new replica list; kept replicas keep their state, removed ones drain.
        `models`: the configured model list of some replicas (the others are polled)."""
        active: dict[str, Replica] = {}
        for url in urls:
            replica = self._active.get(url) or self._draining.pop(url, None) or self._new(url)
            replica.draining = False
            replica.max_concurrency = (max_concurrency or {}).get(url)
            configured = (models or {}).get(url)
            if configured is not None:
                replica.configured_models = replica.models = frozenset(configured)
            elif replica.configured_models is not None:  # its list left the config: poll it
                replica.configured_models = replica.models = None
            active[url] = replica
        for url, replica in self._active.items():
            if url not in active and replica.outstanding > 0:
                replica.draining = True
                self._draining[url] = replica
            elif url not in active:
                self._gone(replica)
        self._active = active
        self.replica_limits = any(r.max_concurrency for r in active.values())
        self._ejected = sum(1 for r in active.values() if r.ejected_until)
        self._available = self._catalog = None
        self._changed()

    def set_healthy(self, replica: Replica, healthy: bool) -> None:
        if replica.healthy != healthy:
            replica.healthy = healthy
            self._available = None
            self._changed()

    def eject(self, replica: Replica, duration_s: float) -> None:
        if not replica.ejected_until:
            self._ejected += 1
        replica.ejections += 1
        replica.ejected_until = self._clock() + duration_s
        self._available = None
        self._changed()

    def ejected_count(self) -> int:
        return self._ejected

    def is_ejected(self, replica: Replica) -> bool:
        return replica.ejected_until > self._clock()

    def next_return_at(self) -> float:
        """When the first ejection runs out (the pool's clock); inf when none is ejected."""
        if not self._ejected:
            return math.inf
        return min(
            (r.ejected_until for r in self._active.values() if r.ejected_until), default=math.inf
        )

    def now(self) -> float:
        return self._clock()

    def acquire(self, replica: Replica, tokens: int = 0) -> None:
        replica.outstanding += 1
        replica.outstanding_tokens += tokens
        replica.requests_total += 1
        self.outstanding += 1
        if self._shared is not None:
            self._shared.set(replica.column, replica.outstanding)
            self._shared.set_outstanding(self.outstanding)

    def progress(self, replica: Replica, tokens: int) -> None:
        """Work done on a request still outstanding (tokens streamed back)."""
        replica.outstanding_tokens -= tokens

    def release(self, replica: Replica, *, outcome: Outcome, tokens: int = 0) -> None:
        """`tokens`: the request's work still counted (its estimate minus progress reported)."""
        self._uncount(replica, tokens)
        if outcome == "failed":
            replica.errors_total += 1
            replica.consecutive_failures += 1
        elif outcome == "served":
            replica.consecutive_failures = 0

    def give_back(self, replica: Replica, tokens: int = 0) -> None:
        """Undo an acquire whose request never went out (its client left as the slot came)."""
        replica.requests_total -= 1
        self._uncount(replica, tokens)

    def _uncount(self, replica: Replica, tokens: int) -> None:
        replica.outstanding -= 1
        replica.outstanding_tokens -= tokens
        self.outstanding -= 1
        if self._shared is not None:
            self._shared.set(replica.column, replica.outstanding)
            self._shared.set_outstanding(self.outstanding)
        if replica.draining and replica.outstanding == 0:
            self._draining.pop(replica.url, None)
            self._gone(replica)

    def report(self, replica: Replica, report: dict[str, float], ours: int) -> None:
        """A load report holding `inflight` requests at the replica, `ours` of them from here."""
        replica.reported = report
        replica.remote = max(0, int(report["inflight"]) - ours)
        replica.reported_at = self._clock()

    def observe_latency(self, replica: Replica, seconds: float, work: int, decay_s: float) -> None:
        """Peak-sensitive EWMA (Finagle's PeakEwma) of seconds per unit of work: a slower
        sample is taken at once, faster ones pull the average down over `decay_s`."""
        sample = seconds / max(1, work)
        now = self._clock()
        if sample >= replica.latency_ewma_s:
            replica.latency_ewma_s = sample
        else:
            weight = math.exp(-(now - replica.latency_at) / decay_s)
            replica.latency_ewma_s = replica.latency_ewma_s * weight + sample * (1 - weight)
        replica.latency_at = now

    def _return_ejected(self) -> None:
        now = self._clock()
        for replica in self._active.values():
            if replica.ejected_until and replica.ejected_until <= now:
                replica.ejected_until = 0.0
                replica.consecutive_failures = 0
                self._ejected -= 1
                self._available = None
