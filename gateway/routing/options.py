"""The policies' options, each type defined once: the config's `routing:` section embeds
AffinityOptions and PrefixOptions as they are (gateway/config/schema.py), and PolicyOptions is what
every policy is handed at construction, assembled from the config (with the clock).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field


class _Options(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AffinityOptions(_Options):
    """Strategy `affinity`: which key keeps a conversation on one replica, and how much more
    than the mean load that replica may take before the key spills to the next one."""

    header: str | None = "X-Session-Id"  # the key, when the request carries this header
    prompt_prefix_chars: int = Field(256, ge=0)  # else the prompt's first N characters; 0 = off
    load_factor: float = Field(1.25, ge=1.0)  # no replica takes more than this x the mean


class PrefixOptions(_Options):
    """Strategies `prefix_aware` and `precise_prefix`: how prompts are hashed and when load wins
    over a cached prefix (see PrefixAware in gateway/routing/policies.py)."""

    block_size: int = Field(16, gt=0, le=1024)  # the replicas' KV block, in tokens
    prefix_length: int = Field(4096, gt=0)  # tokens of a prompt that are hashed (SageMaker's)
    balance_factor: float = Field(1.5, ge=1.0)  # cache wins only below this x the mean load
    concurrency_threshold: int | None = Field(None, gt=0)  # at or above it: load only
    tokens_per_outstanding: int = Field(256, ge=0)  # a request there, its capacity unknown
    tokens_per_running: int = Field(16, ge=0)  # ... one in a free slot (capacity known)
    tokens_per_queued: int = Field(2048, ge=0)  # ... one that would wait for a slot
    max_entries: int = Field(200_000, gt=0)  # (block, replica) pairs kept; LRU go first
    session_header: str | None = "X-Session-Id"
    poll_interval_s: float = Field(0.5, gt=0)  # precise_prefix: GET /cache/blocks cadence


@dataclass(frozen=True)
class PolicyOptions:
    feedback_max_age_s: float = 2.0  # a replica's load report counts for this long
    ewma_decay_s: float = 10.0  # peak_ewma: how fast a faster latency pulls the average down
    affinity: AffinityOptions = field(default_factory=AffinityOptions)
    prefix: PrefixOptions = field(default_factory=PrefixOptions)
    clock: Callable[[], float] = field(default=time.monotonic, compare=False)
