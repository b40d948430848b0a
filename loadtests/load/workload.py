"""The benchmark workload: a seeded, heavy-tailed stream of completion requests.

Every simulated user draws its requests from its own generator seeded by (seed, user index), so
every routing strategy sees the same requests in the same order per user. Output lengths are
lognormal by default (most answers short, a few very long), as generated text is.

A workload can be fitted to a model's limits (`for_model`): every request it draws is one the
model accepts. Without $INFERGATE_BENCH_WORKLOAD (Locust or the open-loop generator run by hand
against `make run`) the workload is fitted to the model `infergate up` serves by default.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass, replace

WORDS = [
    "def",
    "class",
    "return",
    "import",
    "lambda",
    "yield",
    "async",
    "await",
    "tensor",
    "batch",
    "queue",
    "replica",
    "gateway",
    "token",
    "stream",
    "latency",
    "kernel",
    "cache",
    "prefix",
    "decode",
    "prefill",
    "route",
    "least",
    "outstanding",
    "random",
]


@dataclass(frozen=True)
class ModelLimits:
    """What a completion model accepts: `max_tokens` up to `max_tokens`, and prompt tokens plus
    `max_tokens` within `context_len` (the replica refuses either with a 400)."""

    max_tokens: int
    context_len: int


# tiny-gpt as `infergate up` serves it with no replica config (replica/config.py's defaults).
DEFAULT_MODEL_LIMITS = ModelLimits(max_tokens=256, context_len=512)
BOS_TOKENS = 1  # the byte-level tokenizer: a prompt of n bytes is n + 1 tokens


@dataclass(frozen=True)
class Workload:
    seed: int = 0
    model: str = "tiny-gpt"
    distribution: str = "lognormal"  # lognormal | uniform | fixed
    output_median: int = 64  # lognormal median (exp(mu)); uniform/fixed use it as the mean
    output_sigma: float = 1.0  # lognormal shape: 1.0 puts P99 ~10x the median
    output_max: int = 512
    prompt_words_min: int = 8
    prompt_words_max: int = 64
    stream_share: float = 0.5  # fraction of requests sent with stream=true
    context_len: int | None = None  # prompt tokens + max_tokens fit in it; None: no limit

    @classmethod
    def from_env(cls) -> Workload:
        """The benchmark's workload, or without one the default fitted to the default model."""
        raw = os.environ.get("INFERGATE_BENCH_WORKLOAD")
        return cls(**json.loads(raw)) if raw else cls().for_model(DEFAULT_MODEL_LIMITS)

    def for_model(self, limits: ModelLimits) -> Workload:
        """This workload with every request within `limits`: outputs capped at its max_tokens,
        and a prompt that would overflow the context cut by whole words (see `fit`); one word
        always fits."""
        room = limits.context_len - BOS_TOKENS - max(len(w.encode()) for w in WORDS)
        output_max = min(self.output_max, limits.max_tokens, room)
        return replace(self, output_max=output_max, context_len=limits.context_len)

    def to_env(self) -> str:
        return json.dumps(self.__dict__)


@dataclass(frozen=True)
class CompletionRequest:
    prompt: str
    max_tokens: int
    stream: bool

    def body(self, model: str, seed: int) -> dict[str, object]:
        return {
            "model": model,
            "prompt": self.prompt,
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "seed": seed,
            "stream": self.stream,
        }


def user_rng(workload: Workload, user_index: int) -> random.Random:
    return random.Random(f"{workload.seed}:{user_index}")


def output_tokens(workload: Workload, rng: random.Random) -> int:
    if workload.distribution == "fixed":
        n = workload.output_median
    elif workload.distribution == "uniform":
        n = rng.randint(1, 2 * workload.output_median - 1)
    else:
        n = round(rng.lognormvariate(math.log(workload.output_median), workload.output_sigma))
    return max(1, min(workload.output_max, n))


def draw(workload: Workload, rng: random.Random) -> CompletionRequest:
    count = rng.randint(workload.prompt_words_min, workload.prompt_words_max)
    words = [rng.choice(WORDS) for _ in range(count)]
    tokens = output_tokens(workload, rng)
    stream = rng.random() < workload.stream_share
    return CompletionRequest(fit(words, tokens, workload.context_len), tokens, stream)


def fit(words: list[str], max_tokens: int, context_len: int | None) -> str:
    """The prompt of `words`, less its last words while it and `max_tokens` overflow the
    context. Cutting after every draw keeps the random stream as it was: a request that fits
    is the same request with or without a context limit."""
    prompt = " ".join(words)
    if context_len is None:
        return prompt
    room = context_len - max_tokens - BOS_TOKENS
    while len(prompt.encode()) > room and " " in prompt:
        prompt = prompt.rsplit(" ", 1)[0]
    return prompt
