"""`infergate bench --quick` is quick and honest: its plan fits the two minutes README promises
and the duration it announces is the plan's own; the simulated bound is computed over the same
requests as the live window (same length, same output draws); a table from too few samples says
so instead of ranking."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from loadtests.analysis import bound, report, stats
from loadtests.analysis.stats import Interval
from loadtests.harness import plan
from loadtests.harness.plan import Plan, build_plan, parser
from loadtests.load.scenarios import saturation_users
from loadtests.load.workload import Workload
from loadtests.sim import model


def _plan(*args: str) -> Plan:
    return build_plan(parser().parse_args(["--out", "x", *args]))


def _summary(strategy: str, p99_s: float, requests: int, users: int = 20) -> report.Summary:
    return report.Summary(
        users, 5, strategy, 1, requests, 0, 1.0, 2.0, p99_s, 0.5, 0.1, 60.0, 0, None, None, 1.0
    )


def test_quick_plan_fits_its_budget_and_announces_its_own_duration() -> None:
    quick = _plan("--quick")
    assert plan.expected_s(quick) <= plan.QUICK_BUDGET_S == 120
    text = plan.announce(quick)
    assert f"{quick.runs} runs" in text
    seconds = float(re.search(r"about (\d+) s", text).group(1))  # type: ignore[union-attr]
    assert seconds == pytest.approx(plan.expected_s(quick), abs=1)


def test_the_announced_duration_grows_with_the_plan() -> None:
    small, full = _plan("--quick"), _plan()
    assert plan.expected_s(full) > 10 * plan.expected_s(small)
    assert re.search(r"about \d+ min", plan.announce(full))
    # Every run is its warm-up, window and the load generator's tail, plus fixed costs.
    load = full.runs * (full.warmup_s + full.duration_s)
    assert load < plan.expected_s(full) < 1.5 * load


def test_the_bound_is_simulated_over_the_live_window_and_its_draws() -> None:
    quick = _plan("--quick", "--scenarios", "4/1")
    result = bound.central_queue_bound(quick, 4, 1, None)
    alone = model.closed_loop(
        "central_queue", 4, 1, Workload(seed=0), warmup_s=quick.warmup_s,
        duration_s=quick.duration_s,
    )  # fmt: skip
    assert result.samples == len(alone.latencies_s)  # the live window's length, not 600 s
    assert result.per_seed == [pytest.approx(alone.p99_s)]


def test_the_modelled_capacity_is_the_saturation_runs_window() -> None:
    quick = _plan("--quick", "--scenarios", "4/1")
    window = model.closed_loop(
        "least_outstanding_requests", saturation_users(1), 1, Workload(seed=0),
        warmup_s=quick.warmup_s, duration_s=quick.duration_s,
    )  # fmt: skip
    expected = len(window.latencies_s) / quick.duration_s
    assert bound.modelled_capacity(quick) == {(4, 1): pytest.approx(expected)}


def test_too_few_samples_are_said_not_ranked(monkeypatch: pytest.MonkeyPatch) -> None:
    quick = _plan("--quick", "--scenarios", "20/5")
    found = bound.Bound(Interval(16.6, 15.0, 18.0), [16.6], 500)
    monkeypatch.setattr(bound, "central_queue_bound", lambda *a: found)
    live = [_summary("random", 6.2, 60), _summary("least_outstanding_requests", 7.0, 61)]
    text = bound.against_bound(quick, live, {(20, 5): 7.0})
    assert "random" not in text.split("| 20 | 5 |")[1]
    assert "too few samples" in text and "60 requests" in text and "-62.7%" not in text
    enough = [_summary("random", 6.2, 400), _summary("least_outstanding_requests", 7.0, 400)]
    assert "| random | 6.20 | -62.7% |" in bound.against_bound(quick, enough, {(20, 5): 7.0})
    thin_bound = bound.Bound(Interval(6.0, 5.0, 7.0), [6.0], 40)
    monkeypatch.setattr(bound, "central_queue_bound", lambda *a: thin_bound)
    assert "too few samples" in bound.against_bound(quick, enough, {(20, 5): 7.0})


def test_the_p99_table_says_too_few_samples_instead_of_a_change() -> None:
    change = Interval(-0.3, -0.5, -0.1)
    thin = [
        _summary("random", 8.0, 60),
        replace(_summary("least_outstanding_requests", 5.6, 60), p99_change=change),
    ]
    table = report.markdown(thin, "header")
    p99_part = table.split("### Throughput")[0]
    assert "-30.0%" not in p99_part and "too few samples" in p99_part
    lor = replace(_summary("least_outstanding_requests", 5.6, 400), p99_change=change)
    enough = [_summary("random", 8.0, 400), lor]
    assert "-30.0% [-50.0, -10.0]" in report.markdown(enough, "header").split("### Throughput")[0]


def test_a_p99_needs_a_hundred_samples() -> None:
    assert not stats.tail_measured(99) and stats.tail_measured(100)
