"""The policies' options: one frozen type each, read from the config's `routing:` section
(gateway/config.py embeds them) and handed to every policy at construction."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PrefixOptions:
    """Strategy `prefix_aware`; see PrefixAware."""

    block_size: int = 16  # the replicas' KV block, in tokens
    prefix_length: int = 4096  # tokens of each prompt that are hashed (SageMaker's knob)
    balance_factor: float = 1.5  # cache wins only below this x the fleet's mean outstanding
    concurrency_threshold: int | None = None  # at or above it a replica takes no cache win
    tokens_per_outstanding: int = 256  # a request there, when its capacity is unknown
    tokens_per_running: int = 16  # a request there, below its reported capacity
    tokens_per_queued: int = 2048  # a request that would wait there for a slot
    max_entries: int = 200_000  # (block, replica) pairs kept; least recently used go first
    session_header: str | None = "X-Session-Id"
    poll_interval_s: float = 0.5  # precise_prefix: how often each replica's blocks are read


@dataclass(frozen=True)
class PolicyOptions:
    feedback_max_age_s: float = 2.0  # a replica's load report counts for this long
    ewma_decay_s: float = 10.0  # peak_ewma: how fast a faster latency pulls the average down
    affinity_load_factor: float = 1.25  # affinity: no replica takes more than c x the mean
    prefix: PrefixOptions = PrefixOptions()
    clock: Callable[[], float] = field(default=time.monotonic, compare=False)
