"""The policies' options, each type defined once: the config's `routing:` section embeds
AffinityOptions and PrefixOptions as they are (gateway/config/schema.py), and PolicyOptions is what
every policy is handed at construction, assembled from the config (with the clock).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from gateway.routing.tokens import BYTES, PromptTokenizer, TokenizerError, load_tokenizer


def _loadable(spec: str) -> str:
    try:
        load_tokenizer(spec)
    except TokenizerError as exc:
        raise ValueError(str(exc)) from None
    return spec


class _Options(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AffinityOptions(_Options):
    """Strategy `affinity`: which key keeps a conversation on one replica, and how much more
    than the mean load that replica may take before the key spills to the next one."""

    header: str | None = "X-Session-Id"  # the key, when the request carries this header
    prompt_prefix_chars: int = Field(256, ge=0)  # else the prompt's first N characters; 0 = off
    load_factor: float = Field(1.25, ge=1.0)  # no replica takes more than this x the mean


class KvEventsOptions(_Options):
    """`precise_prefix` on the engines' own KV cache events (gateway/control/kv_events.py), as
    vLLM and SGLang publish them with `--kv-events-config`: the gateway subscribes to each
    replica at the replica URL's host, on `port` (+ the data-parallel rank, as the engines
    offset it), and asks `replay_port` for what it missed. A replica's own `kv_events` entry
    overrides both."""

    engine: Literal["vllm", "sglang"] = "vllm"  # how to read positional (older) events
    port: int = Field(5557, ge=1, le=65535)
    replay_port: int | None = Field(None, ge=1, le=65535)  # None: nothing missed is recovered
    topic: str = Field("", max_length=256)  # the engines' `topic`: a prefix filter
    data_parallel_size: int = Field(1, ge=1, le=64)  # publishers per replica, ports in a row
    cpu_weight: float = Field(0.5, ge=0, le=1)  # a block held off the GPU, against one on it
    replay_timeout_s: float = Field(2.0, gt=0)
    max_message_bytes: int = Field(4 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024)

    @model_validator(mode="after")
    def _ports_fit(self) -> KvEventsOptions:
        ranks = self.data_parallel_size
        if self.port + ranks - 1 > 65535:
            raise ValueError(f"port {self.port} + {ranks} data-parallel ranks pass 65535")
        if self.replay_port is not None:
            if self.replay_port + ranks - 1 > 65535:
                raise ValueError(f"replay_port {self.replay_port} + {ranks} ranks pass 65535")
            if abs(self.replay_port - self.port) < ranks:
                raise ValueError("replay_port must not be one of the ports events are published on")
        return self


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
    # How prompts become token ids: `bytes` (our replicas'), or the path of the engine's
    # tokenizer.json (or its directory: chat template from tokenizer_config.json beside it).
    tokenizer: Annotated[str, AfterValidator(_loadable)] = "bytes"
    events: KvEventsOptions | None = None  # precise_prefix: engines' KV events instead of polls


@dataclass(frozen=True)
class PolicyOptions:
    feedback_max_age_s: float = 2.0  # a replica's load report counts for this long
    ewma_decay_s: float = 10.0  # peak_ewma: how fast a faster latency pulls the average down
    affinity: AffinityOptions = field(default_factory=AffinityOptions)
    prefix: PrefixOptions = field(default_factory=PrefixOptions)
    clock: Callable[[], float] = field(default=time.monotonic, compare=False)
    tokenizer: PromptTokenizer = field(default=BYTES, compare=False)  # prefix.tokenizer, loaded
