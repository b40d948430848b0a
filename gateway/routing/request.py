"""What a policy may know of the request it routes (its estimated work, affinity key, prompt
block hashes and model, filled in by the data path's classify only for what the policy says it
`needs`), and the Decision the lease carries: where the request went, by which strategy, why,
and, where asked for, the candidates' scores."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gateway.routing.replica import Replica

Need = str  # "tokens" | "key" | "prefix"


@dataclass(frozen=True)
class RequestInfo:
    """What a policy may know of the request it routes."""

    tokens: int = 0  # estimated work: prompt tokens + max_tokens for completions, else 1
    key: str | None = None  # affinity key (a header's value or a prompt prefix)
    prefix: tuple[int, ...] = ()  # the prompt's leading KV block hashes (gateway/routing/prefix.py)
    prompt_tokens: int = 0  # the whole prompt, in the replica's tokens (for "prefix")
    model: str | None = None  # the served model it asks for (after aliases); None: any replica


NO_INFO = RequestInfo()


@dataclass(slots=True)  # made for every request: not frozen (that costs), never changed
class Decision:
    """One routing decision, as the lease that carries it can tell it (a response header, a
    trace span, a log line)."""

    replica: Replica
    strategy: str  # the policy's registered name
    reason: str  # "free slot": taken at once; "queued": handed over from the gateway queue;
    # "job": a deferred job dispatched into spare capacity; "given": a Lease made directly on a
    # replica, not through admission (strategy "")
    scores: Mapping[str, float] | None = None  # each candidate's cost, where the policy has one
