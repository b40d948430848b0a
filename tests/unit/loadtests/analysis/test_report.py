"""Benchmark report: the offered rate beside the measured capacity, in every summary."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from loadtests.analysis import report
from loadtests.harness.runner import RunResult, RunSpec
from loadtests.load.samples import Sample
from loadtests.load.workload import Workload


def _run(strategy: str, sends: list[tuple[float, float]], duration_s: float = 10.0) -> RunResult:
    """Samples (start, end) in seconds from the window's start at t = 100."""
    samples = [
        Sample(100 + a, 100 + b, "completion", True, 200, b - a, None, 8, "r") for a, b in sends
    ]
    spec = RunSpec(4, 1, strategy, 0, 0.0, duration_s, Workload())
    return RunResult(spec, samples, 100.0, 10.0, 10.0, 10.0)


def test_offered_counts_sends_in_the_window_and_capacity_completions() -> None:
    # Sent at -1 (before the window) and 10.5 (after it) do not count as offered.
    run = _run("random", [(-1, 0.5), (0, 2), (1, 3), (4, 9), (9, 10.5), (10.5, 11)])
    saturation = _run("saturation", [(i * 0.5, i * 0.5 + 0.4) for i in range(20)])
    load = report.Load(report.completed_rps(saturation), 1.5)
    (summary,) = report.summarize([run], 2.0, {(4, 1): load})
    assert summary.offered_rps == pytest.approx(4 / 10)
    assert summary.load.capacity_rps == pytest.approx(20 / 10)
    assert summary.offered_share == pytest.approx(0.2)


def test_every_table_prints_offered_and_capacity(tmp_path: Path) -> None:
    run = _run("random", [(0, 2), (1, 3)])
    (measured,) = report.summarize([run], 2.0, {(4, 1): report.Load(2.0, 1.7)})
    (unmeasured,) = report.summarize([run], 2.0)
    assert math.isnan(unmeasured.load.capacity_rps)
    table = report.markdown([measured], "header")
    assert "| Offered (req/s) | Capacity (req/s) | Offered / capacity |" in table
    assert "| 4 | 1 | random | 0.20 | 2.00 | 10% |" in table
    assert "| 4 | 1 | random | 0.20 | not measured |" in report.markdown([unmeasured], "h")
    report.write_csv(tmp_path / "summary.csv", [measured])
    with (tmp_path / "summary.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert (row["offered_rps"], row["target_rps"], row["capacity_rps"]) == (
        "0.2000",
        "1.7000",
        "2.0000",
    )
    assert row["offered_share"] == "0.1000"


def test_capacity_csv_keeps_the_scenario_and_the_runs_own_users(tmp_path: Path) -> None:
    saturation = _run("saturation", [(0, 1), (1, 2)])
    report.write_capacity_csv(tmp_path / "capacity.csv", {(20, 1): saturation})
    with (tmp_path / "capacity.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert (row["scenario_users"], row["users"], row["strategy"]) == ("20", "4", "saturation")
    assert float(row["capacity_rps"]) == pytest.approx(0.2)
