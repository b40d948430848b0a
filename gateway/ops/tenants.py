"""The status page's tenants table (gateway/ops/status.py): per tenant, the keys that name it,
the most important class they may use, its weight and limits, what waits in the queue, its
service lately (the weighted tokens `fairness: tokens` orders by) and the tokens served and
the requests refused (this worker's counts, under `workers: N`).

Rows: every tenant a configured key names, then those waiting in the queue now (a header can
name any tenant without auth), at most MAX_ROWS.
"""

from __future__ import annotations

from typing import Any

from gateway.config import ApiKey
from gateway.flow.identity import DEFAULT_TENANT
from gateway.ops.flow_metrics import FlowMetrics
from gateway.pool.live import Live

MAX_ROWS = 100


def tenants_document(live: Live, flow: FlowMetrics) -> list[dict[str, Any]]:
    config = live.runtime.config
    keys: dict[str, list[ApiKey]] = {}
    for key in config.auth.api_keys if config.auth is not None else ():
        keys.setdefault(key.tenant_name, []).append(key)
    queued: dict[str, int] = {}
    for (_, tenant), count in live.admission.waiting().items():
        queued[tenant] = queued.get(tenant, 0) + count
    names = list(keys) or [DEFAULT_TENANT]
    names += sorted(t for t in queued if t not in keys and t not in names)
    default = config.flow_control.default if config.flow_control is not None else None
    return [
        _row(live, flow, name, keys.get(name, []), queued.get(name, 0), default)
        for name in names[:MAX_ROWS]
    ]


def _row(
    live: Live,
    flow: FlowMetrics,
    tenant: str,
    keys: list[ApiKey],
    queued: int,
    default_class: str | None,
) -> dict[str, Any]:
    label = flow.label(tenant)
    counted = label == tenant  # other tenants share the "other" series
    return {
        "tenant": tenant,
        "keys": [key.name for key in keys],
        "classes": sorted({key.class_ or default_class or "" for key in keys} - {""}),
        "weight": keys[0].weight if keys else 1.0,
        "limits": [
            key.limits.model_dump(exclude_none=True) if key.limits else None for key in keys
        ],
        "queued": queued,
        "service": round(live.admission.service.value(tenant), 1),
        "prompt_tokens": _count(flow.tokens.labels(label, "prompt")) if counted else None,
        "completion_tokens": _count(flow.tokens.labels(label, "completion")) if counted else None,
        "rate_limited": sum(
            _count(flow.refused.labels(label, code))
            for code in ("requests", "tokens", "parallel_requests", "request_too_large")
        )
        if counted
        else None,
    }


def _count(counter: Any) -> int:
    return int(counter._value.get())
