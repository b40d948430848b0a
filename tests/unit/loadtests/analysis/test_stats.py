"""Benchmark statistics on raw samples: percentiles, blocks, bootstrap intervals."""

from __future__ import annotations

import random
from array import array

import numpy as np
import pytest

from loadtests.analysis import stats
from loadtests.load.workload import Workload, draw, output_tokens, user_rng


def test_percentile_interpolates_raw_samples() -> None:
    data = list(range(1, 101))
    assert stats.percentile(data, 50) == pytest.approx(50.5)
    assert stats.percentile(data, 99) == pytest.approx(99.01)
    assert np.isnan(stats.percentile([], 99))


def test_percentile_reads_samples_in_any_order_and_of_any_numeric_kind() -> None:
    # Benchmarks pass unsorted lists, numpy arrays and integer nanosecond arrays.
    shuffled = [3.0, 1.0, 4.0, 2.0]
    assert stats.percentile(shuffled, 50) == pytest.approx(2.5)
    assert stats.percentile(np.array(shuffled), 90) == pytest.approx(3.7)
    assert stats.percentile(array("q", [4_000, 1_000, 3_000, 2_000]), 100) == 4_000.0
    assert stats.percentile([7], 99) == 7.0


def test_blocks_assign_requests_by_end_time() -> None:
    blocks = stats.blocks_of([10.1, 10.9, 11.5, 12.99, 13.0], [1, 2, 3, 4, 5], 10.0, 3.0, 3)
    assert [list(b.latencies_s) for b in blocks] == [[1, 2], [3], [4]]
    assert stats.per_minute(blocks) == pytest.approx(60 * 4 / 3.0)


def _blocks(rng: random.Random, scale: float, n: int = 30) -> list[stats.Block]:
    return [
        stats.Block(np.array([rng.lognormvariate(0, 0.5) * scale for _ in range(40)]), 2.0)
        for _ in range(n)
    ]


def test_same_distribution_gives_an_interval_around_zero() -> None:
    rng = random.Random(1)
    interval = stats.relative_change(_blocks(rng, 1.0), _blocks(rng, 1.0), stats.p99)
    assert interval.low < 0 < interval.high
    assert not interval.excludes_zero


def test_a_real_shift_is_detected_with_the_right_sign() -> None:
    rng = random.Random(2)
    interval = stats.relative_change(_blocks(rng, 0.6), _blocks(rng, 1.0), stats.p99)
    assert interval.excludes_zero and interval.high < 0
    assert interval.low <= interval.estimate <= interval.high
    assert interval.estimate == pytest.approx(-0.4, abs=0.15)


def test_workload_is_the_same_sequence_for_the_same_seed_and_user() -> None:
    workload = Workload(seed=3)

    def requests(user: int) -> list[object]:
        rng = user_rng(workload, user)
        return [draw(workload, rng) for _ in range(50)]

    assert requests(7) == requests(7)
    assert requests(7) != requests(8)


def test_lognormal_output_lengths_are_heavy_tailed_and_bounded() -> None:
    workload = Workload(output_median=64, output_sigma=1.0, output_max=512)
    rng = random.Random(0)
    lengths = sorted(output_tokens(workload, rng) for _ in range(20_000))
    median, p99 = lengths[10_000], lengths[19_800]
    assert 58 <= median <= 70
    assert p99 >= 6 * median  # the tail a routing policy has to cope with
    assert lengths[0] >= 1 and lengths[-1] <= 512


def test_interval_of_one_statistic_brackets_its_estimate() -> None:
    rng = random.Random(2)
    blocks = _blocks(rng, 1.0)
    interval = stats.interval(blocks, stats.p99)
    assert interval.estimate == pytest.approx(stats.p99(blocks))
    assert interval.low < interval.estimate < interval.high
    assert interval.high - interval.low < interval.estimate  # 30 blocks of 40: not degenerate
