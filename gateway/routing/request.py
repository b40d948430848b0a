"""What a policy may know of the request it routes: the request's estimated work, its
affinity key, its prompt's block hashes and its model, filled in by the data path's classify
only for what the policy says it `needs`."""

from __future__ import annotations

from dataclasses import dataclass

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
