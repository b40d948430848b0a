"""The benchmark workload: a seeded, heavy-tailed stream of completion requests.

Every simulated user draws its requests from its own generator seeded by (seed, user index), so
every routing strategy sees the same requests in the same order per user. Output lengths are
lognormal by default (most answers short, a few very long), as generated text is.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass

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

    @classmethod
    def from_env(cls) -> Workload:
        raw = os.environ.get("INFERGATE_BENCH_WORKLOAD")
        return cls(**json.loads(raw)) if raw else cls()

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
    words = rng.randint(workload.prompt_words_min, workload.prompt_words_max)
    prompt = " ".join(rng.choice(WORDS) for _ in range(words))
    return CompletionRequest(
        prompt, output_tokens(workload, rng), rng.random() < workload.stream_share
    )
