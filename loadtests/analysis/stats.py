"""Statistics for the benchmark, from raw per-request samples (never Locust's bucketed ones).

A run's measurement window is cut into equal time blocks; a block holds the requests that ended
in it. Confidence intervals resample blocks with replacement (a block bootstrap: requests close
in time share queue state, so resampling single requests would understate the spread), pooled
over every seed's run of a strategy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# Below this many requests a P99 is the slowest request (or between the two slowest): no tail
# estimate to compare or rank by, whatever its interval says.
MIN_TAIL_SAMPLES = 100


def tail_measured(samples: int) -> bool:
    return samples >= MIN_TAIL_SAMPLES


def percentile(samples: Sequence[float] | np.ndarray, q: float) -> float:
    """Linear-interpolated percentile of raw samples (numpy's default), in any order; NaN when
    there are none. The one definition every benchmark reports."""
    if len(samples) == 0:
        return float("nan")
    return float(np.percentile(np.asarray(samples, dtype=float), q))


@dataclass(frozen=True)
class Block:
    """The requests that ended in one time block of one run."""

    latencies_s: np.ndarray
    seconds: float


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def blocks_of(
    end_times: Sequence[float],
    latencies: Sequence[float],
    start: float,
    window_s: float,
    n_blocks: int,
) -> list[Block]:
    ends = np.asarray(end_times, dtype=float)
    lats = np.asarray(latencies, dtype=float)
    width = window_s / n_blocks
    index = np.floor((ends - start) / width).astype(int)
    return [Block(lats[index == b], width) for b in range(n_blocks)]


def p99(blocks: Sequence[Block]) -> float:
    return percentile(np.concatenate([b.latencies_s for b in blocks]), 99)


def per_minute(blocks: Sequence[Block]) -> float:
    return 60 * sum(len(b.latencies_s) for b in blocks) / sum(b.seconds for b in blocks)


Statistic = Callable[[Sequence[Block]], float]


def relative_change(
    treatment: Sequence[Block],
    control: Sequence[Block],
    statistic: Statistic,
    *,
    resamples: int = 2000,
    seed: int = 0,
) -> Interval:
    """(statistic(treatment) - statistic(control)) / statistic(control), with a 95% block
    bootstrap interval; the two sides are resampled independently."""
    rng = np.random.default_rng(seed)
    estimate = statistic(treatment) / statistic(control) - 1
    draws = np.empty(resamples)
    for i in range(resamples):
        t = [treatment[j] for j in rng.integers(0, len(treatment), len(treatment))]
        c = [control[j] for j in rng.integers(0, len(control), len(control))]
        draws[i] = statistic(t) / statistic(c) - 1
    low, high = np.nanpercentile(draws, [2.5, 97.5])
    return Interval(float(estimate), float(low), float(high))


def interval(
    blocks: Sequence[Block], statistic: Statistic, *, resamples: int = 2000, seed: int = 0
) -> Interval:
    """statistic(blocks), with a 95% block-bootstrap interval."""
    rng = np.random.default_rng(seed)
    draws = np.empty(resamples)
    for i in range(resamples):
        draws[i] = statistic([blocks[j] for j in rng.integers(0, len(blocks), len(blocks))])
    low, high = np.nanpercentile(draws, [2.5, 97.5])
    return Interval(statistic(blocks), float(low), float(high))
