"""The batching benchmark's arithmetic: tokens/s at a P99 target."""

from __future__ import annotations

import math

from pytest import approx

from loadtests.batching_bench import at_p99


def test_the_best_point_under_the_target_or_the_line_to_the_next_one_above() -> None:
    curve = [(0.30, 100.0), (0.40, 300.0), (0.80, 500.0)]
    assert at_p99(curve, 0.40) == (300.0, "")
    assert at_p99(curve, 0.60) == (approx(400.0), "")  # halfway from 0.40 to 0.80
    assert at_p99(curve, 0.35) == (approx(200.0), "")


def test_a_curve_that_is_not_monotonic_keeps_its_best_point_under_the_target() -> None:
    # A static batcher waits out max_wait_ms with few clients: its P99 falls when batches fill.
    curve = [(0.26, 126.0), (0.47, 657.0), (0.35, 2572.0), (0.45, 2973.0), (0.68, 2324.0)]
    value, mark = at_p99(curve, 0.35)
    assert (value, mark) == (2572.0, "")
    assert at_p99(curve, 0.46)[0] == 2973.0  # the line on to (0.68, 2324) only falls
    assert at_p99(curve, 0.40)[0] == approx(2572.0 + 0.5 * (2973.0 - 2572.0))


def test_a_sweep_that_never_reaches_the_target_or_starts_above_it_says_so() -> None:
    assert at_p99([(0.1, 10.0), (0.2, 20.0)], 0.5) == (20.0, ">=")
    value, mark = at_p99([(0.6, 10.0), (0.9, 20.0)], 0.5)
    assert math.isnan(value) and mark == ""
