"""The headers of a relayed exchange: what goes to the replica (hop-by-hop dropped, the
forwarding headers set from what the gateway saw, an Idempotency-Key made the API key's own) and
the request id and replica the client is told of."""

from __future__ import annotations

import hashlib
import random
from typing import TYPE_CHECKING

from multidict import CIMultiDictProxy

from gateway.routing.request import Decision

if TYPE_CHECKING:
    from gateway.datapath.downstream import Downstream

REPLICA_HEADER = "X-Infergate-Replica"
DECISION_HEADER = "X-Infergate-Decision"  # with routing.explain: why it went there
REQUEST_ID_HEADER = "X-Request-Id"
# The longest Idempotency-Key replicas take (replica/idempotency.py MAX_KEY_CHARS; Stripe's too).
IDEMPOTENCY_KEY_MAX_CHARS = 255

# RFC 9110 section 7.6.1, plus the non-standard ones seen in the wild.
HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
        "proxy-authorization", "te", "trailer", "trailers", "transfer-encoding", "upgrade",
    }
)  # fmt: skip
# A whole body is relayed with its length recomputed by the server.
RESPONSE_DROPPED = HOP_BY_HOP | {"content-length"}
# Recomputed for the upstream leg: the body is re-sent whole, the client sets Host.
NOT_FORWARDED = frozenset({"host", "content-length", "expect"})
# Set from what the gateway saw (the request id is the client's own or a new one).
FORWARDING = frozenset({"x-request-id", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"})


def _dropped(headers: CIMultiDictProxy[str], extra: frozenset[str]) -> frozenset[str]:
    named = {t.strip().lower() for v in headers.getall("Connection", ()) for t in v.split(",")}
    return HOP_BY_HOP | extra | named


def upstream_request_headers(client: Downstream, request_id: str) -> list[tuple[str, str]]:
    headers = client.headers
    dropped = _dropped(headers, NOT_FORWARDED)
    owner = client.key_name
    out = [
        (k, owned_idempotency_key(owner, v) if owner and lower == "idempotency-key" else v)
        for k, v in headers.items()
        if (lower := k.lower()) not in dropped and lower not in FORWARDING
    ]
    out.append((REQUEST_ID_HEADER, request_id))
    peer = client.remote or "unknown"
    prior = headers.get("X-Forwarded-For")
    out.append(("X-Forwarded-For", f"{prior}, {peer}" if prior else peer))
    # What this gateway saw, never what the client claims (only X-Forwarded-For is a chain).
    out.append(("X-Forwarded-Proto", client.scheme))
    if client.host:
        out.append(("X-Forwarded-Host", client.host))
    return out


def owned_idempotency_key(owner: str, value: str) -> str:
    """With API keys, an Idempotency-Key is the client's within its key: two keys' "1" differ
    at the replica ('/' is in no key name). A valid value the prefix would push past what
    replicas take goes as its SHA-256 (the same value, the same key); one too long in itself
    goes as it is, for the replica to refuse as it would without keys."""
    key = f"{owner}/{value}"
    if len(key) <= IDEMPOTENCY_KEY_MAX_CHARS or len(value) > IDEMPOTENCY_KEY_MAX_CHARS:
        return key
    digest = hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()
    return f"{owner}/{digest}"


def new_request_id() -> str:
    """128 random bits as hex, like a uuid4 without its cost (an id, not a secret)."""
    return f"{random.getrandbits(128):032x}"


def explained(decision: Decision) -> str:
    """X-Infergate-Decision: the strategy, why (a free slot, handed over from the queue ...)
    and, where the policy chooses by cost, the chosen replica's cost and the runner-up's (lower
    wins; read just after the choice, so the chosen one counts this request), e.g.
    `strategy=precise_prefix; reason="free slot"; cost=-1184; runner_up=http://b:8000;
    runner_up_cost=16`."""
    parts = [f"strategy={decision.strategy or 'none'}", f'reason="{decision.reason}"']
    scores = decision.scores
    chosen = decision.replica.url
    if scores and chosen in scores:
        parts.append(f"cost={scores[chosen]:g}")
        others = [(cost, url) for url, cost in scores.items() if url != chosen]
        if others:
            cost, url = min(others)
            parts += [f"runner_up={url}", f"runner_up_cost={cost:g}"]
    return "; ".join(parts)
