"""The simulated central-queue bound beside the live runs: over the same seeds, with an
interval, and at the same share of capacity as the live runs were offered."""

from __future__ import annotations

import pytest

from loadtests.analysis import bound, report
from loadtests.analysis.stats import Interval
from loadtests.harness.plan import Plan, build_plan, parser


def _plan(*args: str) -> Plan:
    return build_plan(parser().parse_args(["--scenarios", "4/1", "--out", "x", *args]))


def test_the_bound_is_simulated_over_every_live_seed_with_an_interval() -> None:
    plan = _plan("--seeds", "3", "--output-sigma", "0.5")
    found = bound.central_queue_bound(plan, 4, 1, None)
    interval, seeds = found.interval, found.per_seed
    assert len(seeds) == 3 and len(set(seeds)) == 3  # three different seeds
    assert interval.low <= interval.estimate <= interval.high
    assert min(seeds) <= interval.estimate <= max(seeds)


def test_open_loop_bound_runs_at_the_live_share_of_the_models_capacity(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plan = _plan("--seeds", "2", "--open-loop", "0.7")
    rates: list[float | None] = []

    def fake(plan: Plan, users: int, instances: int, rate: float | None) -> bound.Bound:
        rates.append(rate)
        return bound.Bound(Interval(5.0, 4.0, 6.0), [5.0, 5.0], 300)

    monkeypatch.setattr(bound, "central_queue_bound", fake)
    live = report.Summary(4, 1, "random", 2, 200, 0, 1, 2, 6.0, 1, 0.1, 60.0, 0, None, None, 1.0)
    text = bound.against_bound(plan, [live], {(4, 1): 2.0})
    assert rates == [pytest.approx(0.7 * 2.0)]
    assert "| 4 | 1 | 5.00 [4.00, 6.00] | 5.00, 5.00 | random | 6.00 | +20.0% |" in text
    assert "Poisson arrivals at 70% of the model's own capacity" in text
