"""The replica as routing sees it: one record per replica of what the pool knows of it
(outstanding requests and work, health, ejection, reported load, latency, served models).

The pool (gateway/pool/replicas.py) is its one owner and the only writer; policies only read it.
It lives here, below the pool, so that routing depends on nothing but this type.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol


class WorkerCounts(Protocol):
    """Every worker's counts at the replicas (`workers: N`; gateway/pool/shared.py)."""

    def total(self, column: int) -> int: ...

    def publish(self, column: int, values: tuple[int, ...]) -> None: ...

    def stats(self, column: int) -> tuple[int, ...]: ...


# What a finished request says about its replica: served (resets the failure streak, a latency
# sample), failed (extends the streak), not_served (a refusal or a client that left: neither).
Outcome = Literal["served", "failed", "not_served"]


@dataclass(eq=False)
class Replica:
    url: str
    healthy: bool = True
    draining: bool = False
    outstanding: int = 0
    requests_total: int = 0
    errors_total: int = 0
    consecutive_failures: int = 0
    ejections: int = 0  # times ejected by outlier detection; the back-off grows with it
    ejected_until: float = 0.0  # monotonic clock; 0 when not ejected
    max_concurrency: int | None = None  # this replica's own slot limit at the gateway queue
    outstanding_tokens: int = 0  # estimated work (tokens) of the requests outstanding
    remote: int = 0  # requests other gateways had here at the last report
    reported_at: float = -math.inf  # monotonic time of the last load report
    reported: dict[str, float] | None = None  # the last report: queued, running, inflight, ...
    latency_ewma_s: float = 0.0  # peak-sensitive moving average of seconds per unit of work
    latency_at: float = 0.0  # monotonic time of the last latency sample
    # The models it serves: from `replicas[].models` in the config, else its GET /v1/models;
    # None while unknown (it may serve anything, as every replica did before model routing).
    models: frozenset[str] | None = None
    configured_models: frozenset[str] | None = None  # replicas[].models; never polled then
    model_cards: tuple[dict[str, Any], ...] = ()  # its /v1/models entries, as it sent them
    model_load: dict[str, int] = field(default_factory=dict)  # in flight per engine model label
    # With `workers: N`, the counts every worker has here (gateway/pool/shared.py), at `column`.
    shared: WorkerCounts | None = field(default=None, repr=False)
    column: int = -1

    @property
    def busy(self) -> int:
        """Requests this gateway has outstanding here: this process's, plus its sibling
        workers' (`workers: N`). What routing and slot limits count."""
        return self.outstanding if self.shared is None else self.shared.total(self.column)

    def serves(self, model: str | None) -> bool:
        return model is None or self.models is None or model in self.models

    def as_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "healthy": self.healthy,
            "draining": self.draining,
            "ejected": self.ejected_until > 0,
            "outstanding": self.busy,
            "outstanding_tokens": self.outstanding_tokens,
            "max_concurrency": self.max_concurrency,
            "requests_total": self.requests_total,
            "errors_total": self.errors_total,
            "ejections_total": self.ejections,
            "reported": self.reported,
            "remote": self.remote,
            "kv_usage": (self.reported or {}).get("kv_usage"),
            "cache_hit_ratio": self.cache_hit_ratio(),
            "latency_ewma_s": round(self.latency_ewma_s, 6),
            "models": sorted(self.models) if self.models is not None else None,
            "model_load": self.model_load or None,
        }

    def cache_hit_ratio(self) -> float | None:
        """Prompt tokens the replica served from its prefix cache, over those it looked up,
        since it started (its own counts, from its last load report)."""
        report = self.reported or {}
        queried = report.get("prefix_cache_queried_tokens", 0)
        return round(report.get("prefix_cache_hit_tokens", 0) / queried, 4) if queried else None

    def load(self, now: float, max_age_s: float) -> int:
        """Requests at the replica as best known: ours, plus others' while the report is fresh."""
        if now - self.reported_at <= max_age_s:
            return self.busy + self.remote
        return self.busy
